"""Decode speed of the hybrid as a vLLM model (proxyalign-vllm) against proxyalign's own HF engine.

Run with the vLLM virtualenv, which has both (``make vllm-setup``)::

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1 \\
        .venv-vllm/bin/python benchmarks/vllm_vs_hf.py --pairs tiny real

Same criterion, same plain-text prompts, same ``max_tokens``, temperature 1 (vLLM's requests must use
it), the same dtype for both, token-level mode for proxyalign. Each batch size is one call of
``generate`` over that many prompts (after one warm-up call), timed ``--reps`` times; tokens/s counts
the tokens each engine actually produced (both stop at EOS). vLLM's engine start-up (weights, KV cache,
its processes) is reported apart. The HF engine runs q* only on the rows p's criterion asks it for
(dual_kad reads q* lazily); the vLLM model runs every model on every step.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from decode_speed import PROMPTS

REAL_PROMPTS = PROMPTS  # the code prompts of decode_speed.py: the same work as its figures
#: The tiny tokenizer's words are w4 ... w57 (proxyalign.testing.tiny_tokenizer).
TINY_PROMPTS = [" ".join(f"w{4 + (7 * i + j) % 50}" for j in range(6 + i)) for i in range(8)]


def measure(run: Callable[[list[str]], int], prompts: list[str], reps: int) -> tuple[float, float, float]:
    """(median, min, max) tokens/s of ``run(prompts)`` over ``reps`` timed calls after one warm-up."""
    run(prompts)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        tokens = run(prompts)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates), min(rates), max(rates)


def bench_hf(
    base: str,
    aligned: str,
    criterion: str,
    dtype: str,
    max_tokens: int,
    batches: dict[int, list[str]],
    reps: int,
) -> tuple[float, dict[int, tuple[float, float, float]]]:
    import proxyalign

    start = time.perf_counter()
    pa = proxyalign.ProxyAligner.from_pretrained(
        base, aligned, criterion=criterion, dtype=dtype, device="cpu",
        prompt_formats={"base": "plain", "aligned": "plain"},
    )  # fmt: skip
    load_s = time.perf_counter() - start
    seed = iter(range(1_000_000))

    def run(prompts: list[str]) -> int:
        gens = pa.generate(prompts, max_new_tokens=max_tokens, temperature=1.0, seed=next(seed), mode="token")
        return sum(len(g.token_ids) for g in gens)

    try:
        return load_s, {size: measure(run, prompts, reps) for size, prompts in batches.items()}
    finally:
        pa.close()
        gc.collect()


def bench_vllm(
    base: str,
    aligned: str,
    criterion: str,
    dtype: str,
    max_tokens: int,
    batches: dict[int, list[str]],
    reps: int,
    max_len: int = 512,
    enforce_eager: bool = False,
) -> tuple[float, dict[int, tuple[float, float, float]]]:
    import proxyalign_vllm
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        **proxyalign_vllm.engine_args(
            base=base,
            aligned=aligned,
            criterion=criterion,
            dtype=dtype,
            max_model_len=max_len,
            seed=0,
            enforce_eager=enforce_eager,
        )
    )
    start_s = time.perf_counter() - start
    seed = iter(range(1_000_000))

    def run(prompts: list[str]) -> int:
        params = SamplingParams(max_tokens=max_tokens, seed=next(seed))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    try:
        return start_s, {size: measure(run, prompts, reps) for size, prompts in batches.items()}
    finally:
        llm.llm_engine.engine_core.shutdown()
        gc.collect()


def main() -> None:
    from host import describe_host

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", choices=("tiny", "real"), default=["tiny"])
    parser.add_argument("--criterion", default="dual_kad")
    parser.add_argument("--dtype", default="float32", help="for both engines (default float32)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="vLLM without torch.compile/graphs (starts faster)"
    )
    parser.add_argument("--engines", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"])
    args = parser.parse_args()

    print(describe_host())
    import vllm

    mode = "eager" if args.enforce_eager else "compiled (default)"
    print(f"vllm {vllm.__version__} ({mode}); criterion {args.criterion}; {args.dtype}; temperature 1;")
    print(f"max_tokens {args.max_tokens}; {args.reps} reps after a warm-up; tokens/s median (min-max)\n")
    rows = []
    for pair in args.pairs:
        if pair == "tiny":
            from proxyalign_vllm.testing import save_tiny_vllm_models

            dirs = save_tiny_vllm_models(tempfile.mkdtemp(prefix="tiny-vllm-"))
            base, aligned, prompts = dirs["base"], dirs["aligned"], TINY_PROMPTS
        else:
            from proxyalign.testing import real_pair_dirs

            found = real_pair_dirs()
            if found is None:
                print("real pair not fetched (`make fetch`): skipped")
                continue
            base, aligned, prompts = str(found[0]), str(found[1]), REAL_PROMPTS
        batches = {size: [prompts[i % len(prompts)] for i in range(size)] for size in args.batch_sizes}
        results = {}
        for engine in args.engines:
            common = (base, aligned, args.criterion, args.dtype, args.max_tokens, batches, args.reps)
            if engine == "hf":
                setup_s, rates = bench_hf(*common)
            else:  # the tiny models know 256 positions
                setup_s, rates = bench_vllm(
                    *common, max_len=256 if pair == "tiny" else 512, enforce_eager=args.enforce_eager
                )
            results[engine] = (setup_s, rates)
            for size, (median, low, high) in rates.items():
                print(
                    f"{pair} {engine} batch {size}: {median:.1f} tok/s ({low:.1f}-{high:.1f}); "
                    f"setup {setup_s:.1f} s"
                )
        for size in args.batch_sizes:
            cells = []
            for engine in ("hf", "vllm"):
                if engine in results:
                    median, low, high = results[engine][1][size]
                    cells.append(f"{median:.1f} ({low:.1f}-{high:.1f})")
                else:
                    cells.append("-")
            ratio = (
                f"{results['vllm'][1][size][0] / results['hf'][1][size][0]:.2f}x"
                if len(results) == 2
                else "-"
            )
            setups = " / ".join(f"{results[e][0]:.1f}" if e in results else "-" for e in ("hf", "vllm"))
            rows.append(f"| {pair} | {size} | {cells[0]} | {cells[1]} | {ratio} | {setups} |")
    print("\n| pair | batch | HF engine tok/s | vLLM tok/s | vLLM / HF | load s (HF / vLLM start-up) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Decode speed of the token-level hybrid against HF ``generate`` on each model alone, side by side.

Run: ``.venv/bin/python benchmarks/decode_speed.py`` (after ``make fetch``). Every configuration is
measured once per repetition, interleaved, so a noisy machine slows them all alike; we report the
median and the spread (min-max) over repetitions. Ratios are computed from medians of the same run.

The overhead ratio compares the hybrid's time per token with p's plus q*'s: an eager hybrid runs both
models every step, so 1.0 means the hybrid costs exactly its two forward passes and nothing else.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from host import describe_host
from transformers import GenerationConfig

import proxyalign
from proxyalign.testing import real_pair_dirs

PROMPTS = [
    "# A Python module implementing a binary search tree with insert, delete and in-order traversal\n",
    "# Utilities for parsing and validating ISO 8601 dates in Python, with tests\n",
    "// A C function that reverses a singly linked list, with comments explaining each step\n",
    "# A command line todo-list manager in Python using argparse and a JSON file\n",
    "-- SQL schema for a library: books, authors, loans, members, with indexes\n",
    "# Implement Dijkstra's shortest path algorithm in Python with a heap\n",
    "/* JavaScript: debounce and throttle helpers with JSDoc comments */\n",
    "# A Python class for a thread-safe LRU cache with type hints\n",
]


class EagerDualKad(proxyalign.Criterion):
    """dual_kad declared as reading q*, so the engine runs q* every step (the eager path)."""

    name = "dual_kad_eager"
    params = (proxyalign.Param("threshold", 0.4, "as dual_kad"),)
    reads = frozenset({"p", "q_star"})

    def rejection(self, p, q_star=None, q=None):
        return (p < self.params["threshold"]).to(p.dtype)


@dataclass
class Measurement:
    seconds: list[float]
    tokens: list[int]

    @property
    def tokens_per_s(self) -> list[float]:
        return [n / s for n, s in zip(self.tokens, self.seconds, strict=True)]

    @property
    def seconds_per_token(self) -> float:
        return statistics.median(s / n for n, s in zip(self.tokens, self.seconds, strict=True))


def hf_runner(
    model, tokenizer, prompts: list[str], new_tokens: int, temperature: float
) -> Callable[[int], int]:
    """HF generate on one model: sampling with the same temperature, no top-k/top-p/repetition penalty."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=151645,
    )

    def run(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(**batch, generation_config=config)
        generated = out[:, batch["input_ids"].shape[1] :]
        return int((generated != tokenizer.pad_token_id).sum())

    return run


def hybrid_runner(pa, prompts, new_tokens, temperature, criterion) -> Callable[[int], int]:
    def run(seed: int) -> int:
        gens = pa.generate(
            prompts, max_new_tokens=new_tokens, temperature=temperature, seed=seed, criterion=criterion
        )
        return sum(g.stats.new_tokens for g in gens)

    return run


def measure(runners: dict[str, Callable[[int], int]], reps: int) -> dict[str, Measurement]:
    results = {name: Measurement([], []) for name in runners}
    for run in runners.values():  # warm-up
        run(0)
    for rep in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            tokens = run(rep + 1)
            results[name].seconds.append(time.perf_counter() - start)
            results[name].tokens.append(tokens)
    return results


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        raise SystemExit("fetch the pair first: proxyalign models fetch qwen2.5-coder-pair")
    torch.set_grad_enabled(False)
    pa = proxyalign.ProxyAligner.from_pretrained(str(dirs[0]), str(dirs[1]), dtype="bfloat16", device="cpu")
    p, q_star, tokenizer = pa.models["base"], pa.models["aligned"], pa.tokenizer
    weights = sum(t.numel() * t.element_size() for m in (p, q_star) for t in m.state_dict().values())

    print(describe_host())
    print(f"bf16; {args.new_tokens} new tokens; {args.reps} reps; T={args.temperature}")
    print("\n| batch | configuration | tokens/s median (min-max) | ms/token/row |")
    print("|---|---|---|---|")
    summary = []
    for batch in args.batch_sizes:
        prompts = (PROMPTS * ((batch + len(PROMPTS) - 1) // len(PROMPTS)))[:batch]
        runners = {
            "HF generate, p alone": hf_runner(p, tokenizer, prompts, args.new_tokens, args.temperature),
            "HF generate, q* alone": hf_runner(q_star, tokenizer, prompts, args.new_tokens, args.temperature),
            "hybrid confidence_bet (eager)": hybrid_runner(
                pa, prompts, args.new_tokens, args.temperature, "confidence_bet"
            ),
            "hybrid dual_kad (eager)": hybrid_runner(
                pa, prompts, args.new_tokens, args.temperature, EagerDualKad()
            ),
            "hybrid dual_kad (lazy q*)": hybrid_runner(
                pa, prompts, args.new_tokens, args.temperature, "dual_kad"
            ),
        }
        results = measure(runners, args.reps)
        for name, m in results.items():
            per_row_ms = 1000 * m.seconds_per_token * batch
            print(f"| {batch} | {name} | {fmt(m.tokens_per_s)} | {per_row_ms:.1f} |")
        base_cost = (
            results["HF generate, p alone"].seconds_per_token
            + results["HF generate, q* alone"].seconds_per_token
        )
        summary.append((batch, results, base_cost))

    print(
        "\n| batch | overhead ratio, confidence_bet | overhead ratio, dual_kad eager "
        "| lazy/eager speed-up (dual_kad) |"
    )
    print("|---|---|---|---|")
    for batch, results, base_cost in summary:
        cb = results["hybrid confidence_bet (eager)"].seconds_per_token / base_cost
        eager = results["hybrid dual_kad (eager)"].seconds_per_token
        lazy = results["hybrid dual_kad (lazy q*)"].seconds_per_token
        print(f"| {batch} | {cb:.3f} | {eager / base_cost:.3f} | {eager / lazy:.2f}x |")
    if len(summary) > 1:
        first, last = summary[0], summary[-1]
        print(f"\nbatch {last[0]} / batch {first[0]} throughput:")
        for name in first[1]:
            ratio = statistics.median(last[1][name].tokens_per_s) / statistics.median(
                first[1][name].tokens_per_s
            )
            print(f"- {name}: {ratio:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"\npeak RSS {peak / 2**30:.2f} GiB; weights of p + q* {weights / 2**30:.2f} GiB "
        f"(ratio {peak / weights:.2f})"
    )


if __name__ == "__main__":
    main()

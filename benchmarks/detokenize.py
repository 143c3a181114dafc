"""Detokenizing a row as it grows: a full decode per token against proxyalign's windowed decode.

    python benchmarks/detokenize.py [--tokens 4096] [--rows 64]

The engine's thread turns every new token of every row into text (stop strings, streamed deltas).
Decoding the whole row each time costs O(n) per token; ``TextAccumulator`` decodes a window of recent
tokens. This feeds the real tokenizer (q*'s, the one the engine decodes with) a long row of real text
one token at a time both ways, alternating, and prints the mean cost per token at several lengths and
what a step of ``--rows`` such rows spends detokenizing. CPU-only work, the same on any accelerator host.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from host import describe_host
from transformers import AutoTokenizer

from proxyalign.engine.text import TextAccumulator
from proxyalign.testing import real_pair_dirs


class FullDecode:
    """The previous way: decode the whole row after each token."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.ids = tokenizer, []

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def per_token_seconds(make: Callable[[], object], ids: list[int], marks: list[int]) -> dict[int, float]:
    """Mean seconds of ``add`` per token over the 64 tokens before each mark."""
    accumulator, spent, out = make(), [], {}
    for token in ids:
        started = time.perf_counter()
        accumulator.add([token])
        spent.append(time.perf_counter() - started)
    for mark in marks:
        window = spent[max(0, mark - 64) : mark]
        out[mark] = sum(window) / len(window)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="length of the row (default 4096)")
    parser.add_argument("--rows", type=int, default=64, help="rows per step for the per-step figure")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    dirs = real_pair_dirs()
    if dirs is None:
        raise SystemExit("the real pair is not fetched: make fetch")
    tokenizer = AutoTokenizer.from_pretrained(dirs[1])
    # source code: what the offline pair (two coder models) writes
    text = (Path(__file__).resolve().parents[1] / "proxyalign" / "aligner.py").read_text()
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[: args.tokens]
    marks = [m for m in (256, 1024, 2048, 4096, 8192) if m <= args.tokens]
    print(f"# {describe_host()}")
    best: dict[str, dict[int, float]] = {}
    for _ in range(args.reps):
        for name, make in (
            ("full decode", lambda: FullDecode(tokenizer)),
            ("windowed", lambda: TextAccumulator(tokenizer)),
        ):
            got = per_token_seconds(make, ids, marks)
            best[name] = {m: min(got[m], best.get(name, {}).get(m, got[m])) for m in marks}
    rows = args.rows
    print(
        f"| row length | full decode, ms/token | windowed | ratio | {rows} rows: ms/step, full | windowed |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for mark in marks:
        old, new = best["full decode"][mark] * 1e3, best["windowed"][mark] * 1e3
        print(f"| {mark} | {old:.3f} | {new:.3f} | {old / new:.1f}x | {old * rows:.1f} | {new * rows:.2f} |")


if __name__ == "__main__":
    main()

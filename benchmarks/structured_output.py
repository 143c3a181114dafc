"""Structured output through the hybrid on the real offline pair: how many answers parse (issue #15).

    python benchmarks/structured_output.py                    # 50 GSM8K questions (long on 2 cores)
    python benchmarks/structured_output.py --calls 3          # a smoke run
    python benchmarks/structured_output.py --method function_calling --criterion aligned

Each of the first ``--calls`` GSM8K test questions goes through LangChain's ``with_structured_output``
with a nested pydantic schema, a worked solution::

    {"question": str, "steps": [{"description": str, "expression": str, "value": number}], "answer": number}

All calls run concurrently (``batch``), so they share the engine's running batch. With the default
method (``json_schema``) every token is constrained to keep the output valid for the schema, so an
answer fails to parse only when ``--max-tokens`` cuts it short; the script counts parsed answers, those
cut short, and (for information) answers equal to GSM8K's gold answer. Prints the host line first.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from host import describe_host
from langchain_proxyalign import ChatProxyAlign
from pydantic import BaseModel, Field

from proxyalign import ProxyAligner
from proxyalign.eval.data import load_gsm8k
from proxyalign.eval.extract import numbers_equal
from proxyalign.settings import DEFAULT_CRITERION
from proxyalign.testing import REAL_PAIR

INSTRUCTION = "Solve this math word problem step by step, then give the final answer as a number.\n\n"


class Step(BaseModel):
    """One step of a worked solution."""

    description: str = Field(description="what this step computes", max_length=120)
    expression: str = Field(description="the arithmetic expression, e.g. '3 * 4'", max_length=80)
    value: float = Field(description="the expression's value")


class Solution(BaseModel):
    """A worked solution to a word problem."""

    # Bounded, as the grammar then enforces: left free, the model restates the whole problem, and now
    # and then lists steps until the token limit (2 of 50 at 768 tokens).
    question: str = Field(description="the question, restated briefly", max_length=120)
    steps: list[Step] = Field(description="the steps of the solution, in order", max_length=8)
    answer: float = Field(description="the final answer")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="GSM8K questions, one call each")
    parser.add_argument("--criterion", default=DEFAULT_CRITERION, help="'base', 'aligned' or a hybrid's")
    parser.add_argument("--method", default="json_schema", choices=["json_schema", "function_calling"])
    parser.add_argument("--max-tokens", type=int, default=768, help="new tokens per call")
    parser.add_argument("--concurrency", type=int, default=16, help="calls decoding at once")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: the loader's choice")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args()


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def outcome(result: dict[str, Any], gold: str) -> dict[str, Any]:
    """One call's record: parsed or not (and why), cut short or not, the answer and whether it is right."""
    raw, parsed = result["raw"], result["parsed"]
    meta = raw.response_metadata
    return {
        "parsed": parsed is not None,
        "error": None if result["parsing_error"] is None else str(result["parsing_error"])[:200],
        "finish_reason": meta.get("finish_reason"),
        "tokens": raw.usage_metadata["output_tokens"] if raw.usage_metadata else None,
        "answer": parsed.answer if parsed is not None else None,
        "correct": parsed is not None and numbers_equal(_number(parsed.answer), gold),
        "steps": len(parsed.steps) if parsed is not None else None,
    }


def main() -> None:
    args = parse_args()
    print(describe_host())
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    problems = load_gsm8k(limit=args.calls, shots=0, progress=False)
    aligner = ProxyAligner.from_pretrained(*REAL_PAIR, dtype=args.dtype, device=args.device)
    chat = ChatProxyAlign(
        aligner=aligner, criterion=args.criterion, max_tokens=args.max_tokens, temperature=0
    )
    structured = chat.with_structured_output(Solution, method=args.method, include_raw=True)
    started = time.perf_counter()
    results = structured.batch(
        [INSTRUCTION + p.question for p in problems], config={"max_concurrency": args.concurrency}
    )
    seconds = time.perf_counter() - started
    records = [outcome(r, p.answer) for r, p in zip(results, problems, strict=True)]
    parsed = sum(r["parsed"] for r in records)
    finishes = Counter(r["finish_reason"] for r in records)
    tokens = sum(r["tokens"] or 0 for r in records)
    print(
        f"{args.method}, criterion {args.criterion}, max_tokens {args.max_tokens}: "
        f"{parsed}/{len(records)} parsed; finish reasons {dict(finishes)}; "
        f"{sum(r['correct'] for r in records)}/{len(records)} answers equal GSM8K's; "
        f"{tokens} tokens in {seconds:.1f}s ({tokens / seconds:.1f} tokens/s)"
    )
    for number, record in enumerate(records):
        if not record["parsed"]:
            print(f"  call {number}: not parsed ({record['finish_reason']}): {record['error']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"host": describe_host(), "args": vars(args), "records": records}, handle, indent=2)


if __name__ == "__main__":
    main()

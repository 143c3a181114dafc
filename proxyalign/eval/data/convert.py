"""Raw rows (a JSONL line, a hub row, a wheel row) as :class:`~proxyalign.eval.data.catalog.Problem`\\ s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data.catalog import Problem
from proxyalign.eval.extract import extract_boxed, normalize_number

__all__ = ["LETTERS", "boxed_answer", "choice_problem", "record_to_problem"]

LETTERS = "ABCDEFGHIJ"


def boxed_answer(solution: str) -> str:
    """The last ``\\boxed{}`` of a reference solution (MATH's gold answer)."""
    answer = extract_boxed(solution, fallback=False)
    if answer is None:
        raise ProxyAlignError(f"no \\boxed{{}} answer in solution: {solution[-200:]!r}")
    return answer


def choice_problem(
    dataset: str, record_id: str, question: str, labels: Sequence[str], texts: Sequence[str], key: str
) -> Problem:
    """A multiple-choice item with letters A, B, … whatever the source labels were (ARC has 1-4)."""
    letters = LETTERS[: len(labels)]
    source = [str(label) for label in labels]
    if str(key) not in source:
        raise ProxyAlignError(f"{dataset} {record_id}: answer key {key!r} not among labels {source}")
    return Problem(
        id=f"{dataset}-{record_id}",
        question=question,
        answer=letters[source.index(str(key))],
        kind="choice",
        choices=tuple(str(t) for t in texts),
        labels=tuple(letters),
        dataset=dataset,
    )


def _first(record: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return record[key]
    return None


def _gold_number(value: Any) -> str:
    text = str(value)
    if "####" in text:  # GSM8K's full answer: chain of thought, then "#### N"
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "")


def _looks_numeric(value: Any) -> bool:
    return normalize_number(_gold_number(value)) is not None


def _choices(choices: Any, dataset: str, record_id: str) -> tuple[list[str], list[str]]:
    if isinstance(choices, Mapping) and "text" in choices:
        texts = [str(t) for t in choices["text"]]
        labels = [str(label) for label in choices.get("label", LETTERS[: len(texts)])]
        return labels, texts
    if isinstance(choices, Mapping):
        return [str(k) for k in choices], [str(v) for v in choices.values()]
    if isinstance(choices, Sequence) and not isinstance(choices, str):
        texts = [str(t) for t in choices]
        return list(LETTERS[: len(texts)]), texts
    raise ProxyAlignError(
        f"{dataset} record {record_id}: choices must be a list or a mapping, got {choices!r}"
    )


def record_to_problem(
    record: Mapping[str, Any], dataset: str, index: int, kind: str | None = None
) -> Problem:
    """One JSONL (or hub) record as a :class:`Problem`.

    Accepted fields: ``id``/``ID``/``idx``; ``question``/``problem``/``Question`` (SVAMP's ``Body`` is
    prepended); ``answer``/``Answer``/``short_answer``/``answerKey``/``gold``/``label`` or a MATH
    ``solution`` (its last ``\\boxed{}``); ``choices`` as a list of texts, ``{"label": [...], "text":
    [...]}`` or ``{letter: text}``; optional ``kind`` (``number``, ``math``, ``choice``) and ``few_shot``.
    """
    record_id = _first(record, "id", "ID", "idx", "index", "unique_id")
    record_id = str(index if record_id is None else record_id)
    question = _first(record, "question", "problem", "Question", "question_concat")
    if question is None:
        raise ProxyAlignError(f"{dataset} record {record_id}: no question field (question/problem/Question)")
    body = _first(record, "Body")
    if body and "question_concat" not in record:
        question = f"{str(body).strip()} {str(question).strip()}"
    choices = record.get("choices")
    kind = record.get("kind") or kind or ("choice" if choices else None)
    answer = _first(record, "answer", "Answer", "short_answer", "answerKey", "gold", "label", "target")
    if answer is None and record.get("solution"):
        answer = boxed_answer(str(record["solution"]))
        kind = kind or "math"
    if answer is None:
        raise ProxyAlignError(f"{dataset} record {record_id}: no answer field (answer/Answer/answerKey/gold)")
    if kind == "choice" or choices:
        labels, texts = _choices(choices, dataset, record_id)
        key = answer
        if isinstance(key, int) and not isinstance(key, bool) and str(key) not in labels:
            key = labels[key]
        problem = choice_problem(dataset, record_id, str(question), labels, texts, str(key))
        problem = replace(
            problem, id=f"{dataset}-{record_id}" if not record_id.startswith(dataset) else record_id
        )
    else:
        if kind is None:
            kind = "number" if _looks_numeric(answer) else "math"
        gold = _gold_number(answer) if kind == "number" else str(answer)
        problem = Problem(
            id=record_id if record_id.startswith(f"{dataset}-") else f"{dataset}-{record_id}",
            question=str(question),
            answer=gold,
            kind=kind,
            dataset=dataset,
        )
    few_shot = record.get("few_shot")
    return replace(problem, few_shot=str(few_shot)) if few_shot else problem

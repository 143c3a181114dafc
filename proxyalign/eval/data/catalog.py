"""The known benchmarks (:data:`DATASETS`, names and aliases) and one benchmark item (:class:`Problem`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxyalign.errors import ProxyAlignError

__all__ = ["DATASETS", "DatasetSpec", "Problem", "canonical_dataset"]


@dataclass(frozen=True)
class Problem:
    """One benchmark item.

    ``few_shot`` is the complete plain few-shot prompt for a base model (the standard worked examples,
    then this question in the same format, ending where the answer begins). ``choices``/``labels``
    are the options of a multiple-choice item; ``answer`` is then the gold letter.
    """

    id: str
    question: str
    answer: str
    few_shot: str = ""
    kind: str = "number"  #: "number", "math" or "choice" (see proxyalign.eval.extract)
    choices: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    dataset: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class DatasetSpec:
    """A known benchmark: its answer kind, where it lives offline and on the hub."""

    name: str
    kind: str
    description: str
    offline: bool
    hub: tuple[str, str | None, str]  #: (path, config, test split) for ``datasets.load_dataset``
    hub_dev_split: str | None = None  #: a separate split for margin tuning on the hub, if any
    aliases: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "gsm8k",
            "number",
            "GSM8K test (1,319 grade-school math problems)",
            True,
            ("openai/gsm8k", "main", "test"),
        ),
        DatasetSpec(
            "math500",
            "math",
            "MATH-500 (500 competition problems, boxed LaTeX answers)",
            True,
            ("HuggingFaceH4/MATH-500", None, "test"),
            aliases=("math-500", "math_500", "minerva_math_500", "math"),
        ),
        DatasetSpec(
            "arc_challenge",
            "choice",
            "ARC-Challenge test (1,172 science questions, 3-5 options); validation (299) for tuning",
            True,
            ("allenai/ai2_arc", "ARC-Challenge", "test"),
            hub_dev_split="validation",
            aliases=("arc", "arc-challenge", "arc_c", "arc-c"),
        ),
        DatasetSpec(
            "csqa",
            "choice",
            "CommonsenseQA validation (1,221 questions, 5 options)",
            True,
            ("tau/commonsense_qa", None, "validation"),
            aliases=("commonsense_qa", "commonsenseqa", "commonsense-qa"),
        ),
        DatasetSpec(
            "svamp",
            "number",
            "SVAMP (arithmetic word problems): NOT shipped offline; a local JSONL or the hub",
            False,
            ("ChilleD/SVAMP", None, "test"),
        ),
    )
}


def canonical_dataset(name: str) -> str:
    """The registry name of a dataset given by name or alias (case-insensitive)."""
    key = name.strip().lower()
    for spec in DATASETS.values():
        if key == spec.name or key in spec.aliases:
            return spec.name
    raise ProxyAlignError(
        f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or give a path to a .jsonl file)"
    )

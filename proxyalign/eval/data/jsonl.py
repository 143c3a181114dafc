"""A benchmark from a local JSONL file (``.jsonl`` or ``.jsonl.gz``), one record per line."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data.catalog import Problem
from proxyalign.eval.data.convert import record_to_problem

__all__ = ["load_jsonl"]


def load_jsonl(
    path: str | os.PathLike[str], dataset: str | None = None, kind: str | None = None
) -> list[Problem]:
    """Problems from a local JSONL file (``.jsonl`` or ``.jsonl.gz``), one record per line."""
    file = Path(path)
    if not file.is_file():
        raise ProxyAlignError(f"dataset file {str(file)!r} does not exist")
    name = dataset or file.name.split(".")[0]
    opener = gzip.open if file.suffix == ".gz" else open
    problems = []
    with opener(file, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProxyAlignError(f"{file}:{number + 1}: not valid JSON ({exc.msg})") from None
            problems.append(record_to_problem(record, name, len(problems), kind))
    if not problems:
        raise ProxyAlignError(f"dataset file {str(file)!r} holds no records")
    return problems

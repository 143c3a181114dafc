"""An evaluation directory on disk: ``records.jsonl`` (one line per decoded instance) and ``run.json``.

Each finished instance is one JSON line in ``<output>/records.jsonl``, written with one ``write`` and
flushed to disk as soon as it is decoded. Its key (dataset, split, method and parameters, seed, instance
id) says what it answers: a rerun skips every key already there. ``run.json`` keeps the fingerprint of
the settings that change what is sampled and refuses to resume under other ones.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxyalign.errors import ProxyAlignError

__all__ = ["RECORDS", "RUN_FILE", "RecordStore", "check_run_file", "load_records", "model_id", "record_key"]

RECORDS = "records.jsonl"
RUN_FILE = "run.json"


def record_key(dataset: str, split: str, method: str, seed: int, instance: str) -> str:
    return f"{dataset}|{split}|{method}|seed={seed}|{instance}"


class RecordStore:
    """Append-only JSONL of instance records, one line per instance, each written whole and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut by an interruption: drop it, it is decoded again
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
            data = data[:end]
        for number, line in enumerate(data.decode("utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ProxyAlignError(
                    f"{self.path}:{number + 1} is not valid JSON; fix or remove it"
                ) from None
            self.records.setdefault(record["key"], record)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                if record["key"] in self.records:
                    continue
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                self.records[record["key"]] = record


def load_records(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The instance records of an evaluation directory, read only (a line cut by an interruption is
    skipped, where :class:`RecordStore` truncates it before appending)."""
    path = Path(output_dir) / RECORDS
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.setdefault(record["key"], record)
    return list(records.values())


def model_id(name: str) -> str:
    """A model's name without the machine-specific part of a path (so results move between machines)."""
    if os.path.isabs(name) or os.path.exists(name):
        return "/".join(Path(name).parts[-2:])
    return name


def check_run_file(output: Path, fingerprint: dict[str, Any], details: dict[str, Any]) -> None:
    """Refuse to resume ``output`` under another fingerprint; else log this invocation in ``run.json``."""
    path = output / RUN_FILE
    history: list[dict[str, Any]] = []
    if path.exists():
        saved = json.loads(path.read_text())
        previous = saved.get("fingerprint", {})
        diffs = [
            f"{key}: {previous.get(key)!r} there, {value!r} now"
            for key, value in fingerprint.items()
            if key in previous and previous[key] != value
        ]
        if diffs:
            raise ProxyAlignError(
                f"{output} holds results of another configuration ({'; '.join(diffs)}); resume with the "
                "same settings or choose another --output directory"
            )
        history = list(saved.get("invocations", []))
    history.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details})
    tmp = path.with_suffix(".tmp")
    output.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "invocations": history}, indent=2))
    os.replace(tmp, path)

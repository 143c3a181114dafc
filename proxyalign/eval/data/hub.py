"""A known benchmark from the Hugging Face hub, through the optional ``datasets`` library."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data.catalog import DATASETS, Problem
from proxyalign.eval.data.convert import record_to_problem

__all__ = ["load_hub"]


def load_hub(name: str, split: str) -> list[Problem]:
    """The ``split`` (``"test"`` or a dev split) of the known dataset ``name`` from the hub."""
    spec = DATASETS[name]
    try:
        import datasets as hf_datasets
    except ImportError:
        raise ProxyAlignError(
            f"loading {name} from the hub needs the `datasets` library (pip install datasets) and "
            "network access to the hub; offline, give a local JSONL file instead"
        ) from None
    path, config, test_split = spec.hub
    chosen = test_split if split == "test" else (spec.hub_dev_split or split)
    try:
        rows: Iterable[Mapping[str, Any]] = hf_datasets.load_dataset(path, config, split=chosen)
    except Exception as exc:
        raise ProxyAlignError(
            f"could not load {path} ({chosen}) from the hub: {type(exc).__name__}: {exc}. Offline, give a "
            f"local JSONL file (--datasets {name}=path.jsonl)"
        ) from None
    return [record_to_problem(dict(row), name, i, spec.kind) for i, row in enumerate(rows)]

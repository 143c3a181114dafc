"""Evaluation harness: benchmarks, per-model prompts, answer extraction, reports and margin tuning.

>>> from proxyalign.eval import EvalConfig, run_eval
>>> config = EvalConfig(datasets=["gsm8k"], methods=["base", "aligned", "confidence_bet"], limit=50)
>>> result = run_eval(aligner, config)  # doctest: +SKIP
>>> print(result.report_path.read_text())  # doctest: +SKIP

The command line is ``proxyalign eval`` (see ``docs/evaluation.md``).

One module per job; each imports only from the ones above it:

- ``extract``, ``metrics``: answer extraction and scoring; accuracy, intervals, paired tests;
- ``data``: the benchmarks (a subpackage: catalog, the wheel, few-shot prompts, one loader per source);
- ``prompts``: each model's prompt and stop strings for a question;
- ``methods``: the method mini-language (``confidence_bet[margin=0.2]``) and sweeps;
- ``config``: :class:`EvalConfig`, its validation before any model loads, and :class:`EvalResult`;
- ``store``: ``records.jsonl`` and the ``run.json`` fingerprint check;
- ``runner``: the decoding loop (per-question seeds, the running batch, one record per instance);
- ``distributed``: the same decoding on Ray replicas (a Ray Dataset mapped by an actor pool);
- ``report``: ``summary.json``, ``report.md`` and ``sweep.png`` from records;
- ``harness``: :func:`run_eval` (plan, tune on dev, decode, report) and :func:`evaluate` (load, run);
- ``cli``: ``proxyalign eval``.
"""

from proxyalign.eval.config import EvalConfig, EvalResult, parse_datasets
from proxyalign.eval.data import DATASETS, Problem, load_dataset, load_gsm8k, load_jsonl, load_splits
from proxyalign.eval.distributed import RayDecoder, RayOptions
from proxyalign.eval.extract import (
    extract_answer,
    extract_boxed,
    extract_choice,
    extract_number,
    is_correct,
    math_equal,
    normalize_latex,
    normalize_number,
    numbers_equal,
    score,
)
from proxyalign.eval.harness import evaluate, run_eval
from proxyalign.eval.methods import Method, Sweep, parse_methods, parse_sweep
from proxyalign.eval.metrics import (
    Paired,
    Summary,
    mcnemar_exact,
    paired_comparisons,
    summarize,
    wilson_interval,
)
from proxyalign.eval.prompts import PROMPT_STYLES, build_prompt
from proxyalign.eval.report import report_directory

__all__ = [
    "DATASETS",
    "PROMPT_STYLES",
    "EvalConfig",
    "EvalResult",
    "Method",
    "Paired",
    "Problem",
    "RayDecoder",
    "RayOptions",
    "Summary",
    "Sweep",
    "build_prompt",
    "evaluate",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "extract_number",
    "is_correct",
    "load_dataset",
    "load_gsm8k",
    "load_jsonl",
    "load_splits",
    "math_equal",
    "mcnemar_exact",
    "normalize_latex",
    "normalize_number",
    "numbers_equal",
    "paired_comparisons",
    "parse_datasets",
    "parse_methods",
    "parse_sweep",
    "report_directory",
    "run_eval",
    "score",
    "summarize",
    "wilson_interval",
]

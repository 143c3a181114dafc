"""Evaluation harness: benchmarks, per-model prompts, answer extraction, reports and margin tuning.

>>> from proxyalign.eval import EvalConfig, run_eval
>>> config = EvalConfig(datasets=["gsm8k"], methods=["base", "aligned", "confidence_bet"], limit=50)
>>> result = run_eval(aligner, config)  # doctest: +SKIP
>>> print(result.report_path.read_text())  # doctest: +SKIP

The command line is ``proxyalign eval`` (see ``docs/evaluation.md``).
"""

from proxyalign.eval.data import DATASETS, Problem, load_dataset, load_gsm8k, load_jsonl, load_splits
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
from proxyalign.eval.harness import (
    EvalConfig,
    EvalResult,
    Method,
    Sweep,
    evaluate,
    parse_datasets,
    parse_methods,
    parse_sweep,
    run_eval,
)
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

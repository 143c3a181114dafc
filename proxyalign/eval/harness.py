"""Running an evaluation: datasets x methods x seeds, resumable, with margin tuning on a dev split.

:func:`run_eval` plans the jobs of each dataset, tunes swept parameters on a dev split, decodes the
test questions (:mod:`proxyalign.eval.runner`) into the record store (:mod:`proxyalign.eval.store`),
summarises the records and writes the reports (:mod:`proxyalign.eval.report`). :func:`evaluate`
checks a configuration, loads the models and calls :func:`run_eval`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from proxyalign.aligner import ProxyAligner
from proxyalign.errors import ProxyAlignError
from proxyalign.eval.config import EvalConfig, EvalResult, validate_config
from proxyalign.eval.data import load_splits
from proxyalign.eval.distributed import RayDecoder, RayOptions
from proxyalign.eval.methods import Method, Sweep, format_value, sweep_for
from proxyalign.eval.report import write_reports
from proxyalign.eval.runner import Job, Runner
from proxyalign.eval.store import RECORDS, RecordStore, check_run_file, model_id
from proxyalign.plugins import get_criterion

__all__ = ["evaluate", "run_eval"]


def _accuracy(store: RecordStore, dataset: str, split: str, label: str) -> tuple[int, int]:
    items = [
        r
        for r in store.records.values()
        if (r["dataset"], r["split"], r["method"]) == (dataset, split, label)
    ]
    return sum(bool(r["correct"]) for r in items), len(items)


def run_eval(aligner: Any, config: EvalConfig) -> EvalResult:
    """Evaluate ``config.methods`` on ``config.datasets`` with a loaded :class:`~proxyalign.ProxyAligner`
    (or anything with its ``names`` and ``as_completed``, such as a
    :class:`~proxyalign.eval.distributed.RayDecoder`).

    Writes ``records.jsonl``, ``summary.json``, ``report.md`` and (with sweeps and matplotlib)
    ``sweep.png`` under ``config.output_dir``; resumes from the records already there.

    With ``config.sweeps`` and ``config.dev > 0``, every swept method is decoded with each value on a dev
    split disjoint from the test questions (:func:`~proxyalign.eval.data.load_splits`), the value with the
    best dev accuracy is kept (ties: the first value listed), and only that value runs on the test
    questions. Without ``dev``, every value runs on the test questions (for accuracy-vs-margin plots).
    """
    methods, sweeps, datasets = validate_config(config)
    seeds = [int(s) for s in config.seeds] or [0]
    output = Path(config.output_dir)
    models = {role: model_id(str(name)) for role, name in getattr(aligner, "names", {}).items()}
    fingerprint = {**config.fingerprint(), "models": models}
    details = {
        "datasets": [f"{name}={source}" if source else name for name, source in datasets],
        "methods": [m.label for m in methods],
        "limit": config.limit,
        "seeds": seeds,
        "sweeps": [s.text for s in sweeps],
        "dev": config.dev,
        "mode": config.mode,
        "gamma": config.gamma,
        "batch_size": config.batch_size,
    }
    check_run_file(output, fingerprint, details)
    store = RecordStore(output / RECORDS)
    runner = Runner(aligner, config, store, models)
    tuned: dict[str, dict[str, Any]] = {}

    for name, source in datasets:
        test, dev = load_splits(
            name, source=source, limit=config.limit, dev=config.dev if sweeps else 0, shots=config.shots
        )
        dataset = test[0].dataset if test else name
        fixed: list[Job] = []
        grid: list[tuple[Method, Sweep, str]] = []
        for method in methods:
            found = sweep_for(method, sweeps)
            if found is None:
                fixed.extend(Job(dataset, "test", method, seed) for seed in seeds)
            else:
                grid.append((method, *found))
        test_jobs = list(fixed)
        if grid and dev:
            dev_jobs = [
                Job(dataset, "dev", method.with_param(param, value), seed, param)
                for method, sweep, param in grid
                for value in sweep.values
                for seed in seeds
            ]
            runner.run(dev_jobs, dev, f"{dataset} dev (tuning)")
            for method, sweep, param in grid:
                scores = {}
                for value in sweep.values:
                    correct, n = _accuracy(store, dataset, "dev", method.with_param(param, value).label)
                    scores[format_value(value)] = correct / n if n else 0.0
                best = max(sweep.values, key=lambda v: scores[format_value(v)])  # first of ties
                chosen = method.with_param(param, best)
                tuned[f"{dataset}|{chosen.label}"] = {
                    "dataset": dataset,
                    "criterion": method.criterion,
                    "param": param,
                    "value": best,
                    "dev_size": len(dev),
                    "dev_accuracy": scores,
                }
                test_jobs.extend(Job(dataset, "test", chosen, seed, param) for seed in seeds)
        else:
            for method, sweep, param in grid:
                test_jobs.extend(
                    Job(dataset, "test", method.with_param(param, value), seed, param)
                    for value in sweep.values
                    for seed in seeds
                )
        runner.run(test_jobs, test, f"{dataset} test")

    records = list(store.records.values())
    result = EvalResult.from_records(output, records, tuned, new_instances=runner.new_instances)
    return write_reports(result, config)


def evaluate(
    base: str,
    aligned: str,
    config: EvalConfig,
    *,
    ray: RayOptions | None = None,
    **load_options: Any,
) -> EvalResult:
    """Load p and q* (hub id, directory, ``.gguf`` or offline asset name) and :func:`run_eval`.

    ``load_options`` go to :meth:`ProxyAligner.from_pretrained` (``dtype``, ``device``, ``small_base`` …).
    With ``ray``, the models load on Ray replicas instead (:mod:`proxyalign.eval.distributed`) and the
    records are the same as a local run's.
    """
    # Fail on a bad method, option or dataset file before a minute of loading weights.
    methods, sweeps, datasets = validate_config(config)
    for name, source in datasets:
        dev = config.dev if sweeps else 0
        load_splits(name, source=source, limit=config.limit, dev=dev, shots=config.shots)
    for method in methods:
        if get_criterion(method.criterion, **method.param_dict).needs_small_base and not load_options.get(
            "small_base"
        ):
            raise ProxyAlignError(
                f"method {method.label} needs the small base model q: pass --small-base (small_base=...)"
            )
    if ray is not None:
        decoder = RayDecoder(base, aligned, ray, criterion=methods[0].criterion, **load_options)
        try:
            return run_eval(decoder, replace(config, methods=methods))
        finally:
            decoder.close()
    aligner = ProxyAligner.from_pretrained(base, aligned, criterion=methods[0].criterion, **load_options)
    try:
        return run_eval(aligner, replace(config, methods=methods))
    finally:
        aligner.close()  # its engine thread and the models' memory go with it

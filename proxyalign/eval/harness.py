"""The evaluation loop: datasets x methods x seeds, resumable, with margin tuning on a dev split.

Every method sees the same questions, the same prompts and the same seeds: question ``i`` of a dataset
and split is decoded with the seed derived from ``(seed, dataset, split, id)`` whatever the method, and
each request has its own generator, so its tokens do not depend on what decodes beside it. Work runs
question-major (question 1 with every method, then question 2 …) through the engine's running batch,
``batch_size`` requests at a time: as one finishes, the next joins, so the batch stays full.

Each finished instance is one JSON line in ``<output>/records.jsonl``, written with one ``write`` and
flushed to disk as soon as it is decoded. A rerun skips every instance whose key (dataset, split,
method and parameters, seed, instance id) is already there, so a resumed run gives the same results as
an uninterrupted one, whatever the batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data import Problem, load_splits
from proxyalign.eval.extract import score
from proxyalign.eval.metrics import Summary, summarize
from proxyalign.eval.prompts import check_style, method_prompt

__all__ = [
    "GENERIC_SWEEP_NAMES",
    "EvalConfig",
    "EvalResult",
    "Method",
    "Sweep",
    "evaluate",
    "parse_datasets",
    "parse_methods",
    "parse_sweep",
    "run_eval",
]

RECORDS = "records.jsonl"
RUN_FILE = "run.json"
#: Sweep names that stand for "the criterion's own parameter" when it has exactly one
#: (confidence_bet: margin; dual_kad, nudging: threshold; primal_kad: alpha).
GENERIC_SWEEP_NAMES = ("lambda", "margin", "threshold", "alpha")
SOURCE_LETTERS = {"base": "p", "aligned": "q", "target": "t", "residual": "r", "bonus": "+"}


# -- methods and sweeps ----------------------------------------------------------------------------
def _format_value(value: float) -> str:
    return format(float(value), "g")


@dataclass(frozen=True)
class Method:
    """A criterion with resolved parameters (defaults filled in); ``pinned`` are the ones the user set."""

    criterion: str
    params: tuple[tuple[str, float], ...] = ()
    pinned: tuple[str, ...] = ()

    @property
    def param_dict(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """``base``, ``confidence_bet[margin=0.2]``: the method's name in keys, tables and plots."""
        if not self.params:
            return self.criterion
        inner = ",".join(f"{k}={_format_value(v)}" for k, v in self.params)
        return f"{self.criterion}[{inner}]"

    def with_param(self, name: str, value: float) -> Method:
        return resolve_method(self.criterion, {**self.param_dict, name: value}, self.pinned)

    @property
    def roles(self) -> tuple[str, ...]:
        """The models whose prompts steer the output (for stop strings)."""
        from proxyalign.plugins import get_criterion

        criterion = get_criterion(self.criterion, **self.param_dict)
        if criterion.always_rejects:
            return ("aligned",)
        if self.criterion == "base":
            return ("base",)
        return ("base", "aligned")


def resolve_method(name: str, params: Mapping[str, Any] | None = None, pinned: Iterable[str] = ()) -> Method:
    """Validate a criterion and its parameters through the registry; fill in the defaults."""
    from proxyalign.plugins import get_criterion

    criterion = get_criterion(name, **dict(params or {}))
    resolved = tuple((k, float(v)) for k, v in sorted(criterion.params.items()))
    return Method(name, resolved, tuple(sorted(set(pinned))))


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_METHOD = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<params>[^\[\]]*)\])?$")


def parse_methods(specs: str | Sequence[str | Method]) -> list[Method]:
    """``"base,aligned,confidence_bet[margin=0.2],dual_kad"`` -> resolved :class:`Method` list.

    Parameters go in brackets, several separated by commas: ``pkg:name[a=1,b=0.5]``. Duplicates (the
    same criterion and resolved parameters) are dropped.
    """
    items: list[str | Method] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        items.extend(_split_top_level(spec) if isinstance(spec, str) else [spec])
    methods: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            method = item
        else:
            match = _METHOD.match(item)
            if match is None:
                raise ProxyAlignError(
                    f"cannot parse method {item!r}; write NAME or NAME[param=value,...], e.g. "
                    "confidence_bet[margin=0.2]"
                )
            params: dict[str, str] = {}
            for pair in _split_top_level(match.group("params") or ""):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise ProxyAlignError(f"method {item!r}: parameters are NAME=VALUE, got {pair!r}")
                params[key.strip()] = value.strip()
            method = resolve_method(match.group("name").strip(), params, params)
        if method.label not in {m.label for m in methods}:
            methods.append(method)
    if not methods:
        raise ProxyAlignError("no methods given; e.g. --methods base,aligned,confidence_bet")
    return methods


@dataclass(frozen=True)
class Sweep:
    """Values of one parameter to try: ``margin=0,0.1,0.2`` or ``dual_kad.threshold=0.2,0.4``."""

    param: str
    values: tuple[float, ...]
    criterion: str | None = None

    def target(self, method: Method) -> str | None:
        """The parameter of ``method`` this sweep varies, or None when it does not apply.

        An exact parameter name applies to every criterion that has it; a generic name (``lambda``,
        ``margin``, ``threshold``, ``alpha``) also maps onto the single parameter of a criterion that
        has just one under another name. A parameter the method pins (``confidence_bet[margin=0.1]``)
        is not swept.
        """
        if self.criterion is not None and self.criterion != method.criterion:
            return None
        names = [k for k, _ in method.params]
        if self.param in names:
            chosen = self.param
        elif self.param in GENERIC_SWEEP_NAMES and len(names) == 1:
            chosen = names[0]
        else:
            return None
        return None if chosen in method.pinned else chosen

    @property
    def text(self) -> str:
        prefix = f"{self.criterion}." if self.criterion else ""
        return f"{prefix}{self.param}=" + ",".join(_format_value(v) for v in self.values)


def parse_sweep(spec: str | Sweep) -> Sweep:
    """``"margin=0,0.1,0.2"`` or ``"dual_kad.threshold=0.2,0.3,0.4"`` -> :class:`Sweep`."""
    if isinstance(spec, Sweep):
        return spec
    name, sep, values = spec.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise ProxyAlignError(f"--sweep expects [CRITERION.]PARAM=V1,V2,..., got {spec!r}")
    criterion, dot, param = name.strip().rpartition(".")
    try:
        numbers = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        raise ProxyAlignError(f"--sweep {spec!r}: values must be numbers separated by commas") from None
    if not numbers:
        raise ProxyAlignError(f"--sweep {spec!r}: give at least one value")
    return Sweep(param.strip(), numbers, criterion.strip() if dot else None)


def parse_datasets(specs: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``"gsm8k,svamp=data/svamp.jsonl,math500=hub,my.jsonl"`` -> ``[(name, source), ...]``."""
    items: list[str] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        items.extend(part.strip() for part in spec.split(",") if part.strip())
    parsed: list[tuple[str, str | None]] = []
    for item in items:
        name, sep, source = item.partition("=")
        parsed.append((name.strip(), source.strip() if sep else None))
    if not parsed:
        raise ProxyAlignError("no datasets given; e.g. --datasets gsm8k,arc_challenge")
    return parsed


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """What to evaluate and how. Everything that changes the sampled distribution is fingerprinted."""

    datasets: Sequence[str | tuple[str, str | None]] = ("gsm8k",)
    methods: Sequence[str | Method] = ("base", "aligned", "confidence_bet")
    limit: int | None = 50
    seeds: Sequence[int] = (0,)
    batch_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    criterion_on: str = "scaled"
    mode: str = "token"
    gamma: int | str = 4
    prompts: Mapping[str, str] = field(default_factory=lambda: {"base": "fewshot", "aligned": "chat-cot"})
    shots: int | None = None
    sweeps: Sequence[str | Sweep] = ()
    dev: int = 0
    output_dir: str | os.PathLike[str] = "eval-results"
    progress: bool = True
    plot: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change what is sampled: a resumed run must use the same ones."""
        return {
            "temperature": float(self.temperature),
            "top_k": self.top_k,
            "top_p": self.top_p,
            "criterion_on": self.criterion_on,
            "max_new_tokens": int(self.max_new_tokens),
            "prompts": {"base": self.prompts["base"], "aligned": self.prompts["aligned"]},
            "shots": self.shots,
        }


@dataclass
class EvalResult:
    """What :func:`run_eval` produced: all records of the output directory and their summaries."""

    output_dir: Path
    records: list[dict[str, Any]]
    summaries: list[Summary]
    tuned: dict[str, dict[str, Any]]  #: "dataset|method" -> {"param", "value", "dev": {value: accuracy}}
    report_path: Path | None = None
    plot_path: Path | None = None
    new_instances: int = 0


# -- the record store ------------------------------------------------------------------------------
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


def _model_id(name: str) -> str:
    """A model's name without the machine-specific part of a path (so results move between machines)."""
    if os.path.isabs(name) or os.path.exists(name):
        return "/".join(Path(name).parts[-2:])
    return name


def _check_run_file(output: Path, fingerprint: dict[str, Any], details: dict[str, Any]) -> None:
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


# -- decoding --------------------------------------------------------------------------------------
def question_seed(seed: int, dataset: str, split: str, instance: str) -> int:
    """The seed of one question: the same for every method, different across questions, datasets and
    seeds. Each request has its own generator, so a question samples the same tokens whatever else is
    decoding beside it (and however a run was split, interrupted or resumed)."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{split}/{instance}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def provenance(sources: Sequence[Any]) -> str:
    """Run-length summary of where tokens came from: ``"p12 q1 p30"`` (p: base, q: aligned, t: target,
    r: speculative residual, +: speculative bonus)."""
    runs: list[list[Any]] = []
    for source in sources:
        letter = SOURCE_LETTERS.get(str(source), "?")
        if runs and runs[-1][0] == letter:
            runs[-1][1] += 1
        else:
            runs.append([letter, 1])
    return " ".join(f"{letter}{count}" for letter, count in runs)


@dataclass
class _Job:
    """One method variant on one split of one dataset, with one seed."""

    dataset: str
    split: str
    method: Method
    seed: int
    sweep_param: str | None = None

    def key(self, problem: Problem) -> str:
        return record_key(self.dataset, self.split, self.method.label, self.seed, problem.id)


class _Runner:
    def __init__(self, aligner: Any, config: EvalConfig, store: RecordStore, models: dict[str, str]) -> None:
        self.aligner = aligner
        self.config = config
        self.store = store
        self.models = models
        self.new_instances = 0

    def run(self, jobs: Sequence[_Job], problems: Sequence[Problem], desc: str) -> None:
        """Decode every (question, method) pair the store lacks, question-major, ``batch_size`` at a time
        in the engine's running batch: a finished question is replaced by the next one at once."""
        if not jobs or not problems:
            return
        todo = [(job, p) for p in problems for job in jobs if job.key(p) not in self.store]
        total = len(jobs) * len(problems)
        bar = _progress(total, total - len(todo), desc, self.config.progress)
        calls = (self._call(job, problem) for job, problem in todo)
        try:
            for position, generation in self.aligner.as_completed(calls, in_flight=self.config.batch_size):
                job, problem = todo[position]
                self.store.append([self._record(job, problem, generation)])
                self.new_instances += 1
                bar.set_postfix_str(job.method.label, refresh=False)
                bar.update(1)
        finally:
            bar.close()

    def _call(self, job: _Job, problem: Problem) -> tuple[Any, dict[str, Any]]:
        config = self.config
        prompt, stops = method_prompt(problem, config.prompts, job.method.roles)
        return prompt, {
            "criterion": job.method.criterion,
            "criterion_params": job.method.param_dict,
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_k": config.top_k,
            "top_p": config.top_p,
            "criterion_on": config.criterion_on,
            "seed": question_seed(job.seed, job.dataset, job.split, problem.id),
            "stop": list(stops),
            "mode": config.mode,
            "gamma": config.gamma,
        }

    def _record(self, job: _Job, problem: Problem, generation: Any) -> dict[str, Any]:
        extracted, correct = score(
            generation.text, problem.answer, problem.kind, problem.labels, problem.choices
        )
        counts: dict[str, int] = {}
        for source in generation.sources:
            counts[str(source)] = counts.get(str(source), 0) + 1
        return {
            "key": job.key(problem),
            "dataset": job.dataset,
            "split": job.split,
            "id": problem.id,
            "method": job.method.label,
            "criterion": job.method.criterion,
            "params": job.method.param_dict,
            "sweep_param": job.sweep_param,
            "seed": job.seed,
            "question_seed": question_seed(job.seed, job.dataset, job.split, problem.id),
            "mode": self.config.mode,
            "kind": problem.kind,
            "gold": problem.answer,
            "extracted": extracted,
            "correct": bool(correct),
            "output": generation.text,
            "finish_reason": str(generation.finish_reason),
            "sources": counts,
            "provenance": provenance(generation.sources),
            "stats": generation.stats.as_dict(),
            "models": self.models,
        }


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)


# -- the public entry points -----------------------------------------------------------------------
def _sweep_for(method: Method, sweeps: Sequence[Sweep]) -> tuple[Sweep, str] | None:
    """The sweep that applies to ``method`` (a criterion-qualified one first) and the parameter it varies."""
    ordered = sorted(sweeps, key=lambda s: s.criterion is None)
    for sweep in ordered:
        target = sweep.target(method)
        if target is not None:
            return sweep, target
    return None


def _accuracy(store: RecordStore, dataset: str, split: str, label: str) -> tuple[int, int]:
    items = [
        r
        for r in store.records.values()
        if (r["dataset"], r["split"], r["method"]) == (dataset, split, label)
    ]
    return sum(bool(r["correct"]) for r in items), len(items)


def run_eval(aligner: Any, config: EvalConfig) -> EvalResult:
    """Evaluate ``config.methods`` on ``config.datasets`` with a loaded :class:`~proxyalign.ProxyAligner`.

    Writes ``records.jsonl``, ``summary.json``, ``report.md`` and (with sweeps and matplotlib)
    ``sweep.png`` under ``config.output_dir``; resumes from the records already there.

    With ``config.sweeps`` and ``config.dev > 0``, every swept method is decoded with each value on a dev
    split disjoint from the test questions (:func:`~proxyalign.eval.data.load_splits`), the value with the
    best dev accuracy is kept (ties: the first value listed), and only that value runs on the test
    questions. Without ``dev``, every value runs on the test questions (for accuracy-vs-margin plots).
    """
    from proxyalign.eval.report import write_reports

    methods, sweeps, datasets = validate_config(config)
    seeds = [int(s) for s in config.seeds] or [0]
    output = Path(config.output_dir)
    models = {role: _model_id(str(name)) for role, name in getattr(aligner, "names", {}).items()}
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
    _check_run_file(output, fingerprint, details)
    store = RecordStore(output / RECORDS)
    runner = _Runner(aligner, config, store, models)
    tuned: dict[str, dict[str, Any]] = {}

    for name, source in datasets:
        test, dev = load_splits(
            name, source=source, limit=config.limit, dev=config.dev if sweeps else 0, shots=config.shots
        )
        dataset = test[0].dataset if test else name
        fixed: list[_Job] = []
        grid: list[tuple[Method, Sweep, str]] = []
        for method in methods:
            found = _sweep_for(method, sweeps)
            if found is None:
                fixed.extend(_Job(dataset, "test", method, seed) for seed in seeds)
            else:
                grid.append((method, *found))
        test_jobs = list(fixed)
        if grid and dev:
            dev_jobs = [
                _Job(dataset, "dev", method.with_param(param, value), seed, param)
                for method, sweep, param in grid
                for value in sweep.values
                for seed in seeds
            ]
            runner.run(dev_jobs, dev, f"{dataset} dev (tuning)")
            for method, sweep, param in grid:
                scores = {}
                for value in sweep.values:
                    correct, n = _accuracy(store, dataset, "dev", method.with_param(param, value).label)
                    scores[_format_value(value)] = correct / n if n else 0.0
                best = max(sweep.values, key=lambda v: scores[_format_value(v)])  # first of ties
                chosen = method.with_param(param, best)
                tuned[f"{dataset}|{chosen.label}"] = {
                    "dataset": dataset,
                    "criterion": method.criterion,
                    "param": param,
                    "value": best,
                    "dev_size": len(dev),
                    "dev_accuracy": scores,
                }
                test_jobs.extend(_Job(dataset, "test", chosen, seed, param) for seed in seeds)
        else:
            for method, sweep, param in grid:
                test_jobs.extend(
                    _Job(dataset, "test", method.with_param(param, value), seed, param)
                    for value in sweep.values
                    for seed in seeds
                )
        runner.run(test_jobs, test, f"{dataset} test")

    records = list(store.records.values())
    summaries = summarize(records)
    for summary in summaries:
        if f"{summary.dataset}|{summary.method}" in tuned and summary.split == "test":
            summary.chosen = True
    result = EvalResult(output, records, summaries, tuned, new_instances=runner.new_instances)
    return write_reports(result, config)


def validate_config(config: EvalConfig) -> tuple[list[Method], list[Sweep], list[tuple[str, str | None]]]:
    """Check everything about an evaluation that needs no model: prompt styles, batch size, limit,
    methods and every swept value; returns the parsed methods, sweeps and datasets."""
    for role in ("base", "aligned"):
        check_style(config.prompts[role])
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ProxyAlignError(f"batch size must be an integer >= 1, got {config.batch_size!r}")
    if config.limit is not None and config.limit < 1:
        raise ProxyAlignError(f"limit must be >= 1 (or None for every question), got {config.limit}")
    if config.dev < 0:
        raise ProxyAlignError(f"dev must be >= 0, got {config.dev}")
    methods = parse_methods(list(config.methods))
    sweeps = [parse_sweep(s) for s in config.sweeps]
    for sweep in sweeps:
        if not any(sweep.target(m) for m in methods):
            labels = ", ".join(m.label for m in methods)
            raise ProxyAlignError(
                f"--sweep {sweep.text} applies to none of the methods ({labels}); "
                "name a criterion with that parameter, or use a generic name (margin, lambda) for "
                "one-parameter criteria"
            )
        for method in methods:  # validate every value now, not after an hour of decoding
            target = sweep.target(method)
            if target:
                for value in sweep.values:
                    method.with_param(target, value)
    datasets: list[tuple[str, str | None]] = []
    for entry in [config.datasets] if isinstance(config.datasets, str) else config.datasets:
        datasets.extend([tuple(entry)] if isinstance(entry, tuple) else parse_datasets(entry))
    return methods, sweeps, datasets


def evaluate(base: str, aligned: str, config: EvalConfig, **load_options: Any) -> EvalResult:
    """Load p and q* (hub id, directory, ``.gguf`` or offline asset name) and :func:`run_eval`.

    ``load_options`` go to :meth:`ProxyAligner.from_pretrained` (``dtype``, ``device``, ``small_base`` …).
    """
    from proxyalign.aligner import ProxyAligner
    from proxyalign.plugins import get_criterion

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
    aligner = ProxyAligner.from_pretrained(base, aligned, criterion=methods[0].criterion, **load_options)
    return run_eval(aligner, replace(config, methods=methods))

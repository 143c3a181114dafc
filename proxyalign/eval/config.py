"""What an evaluation is asked and what it gives back.

:class:`EvalConfig` says what to evaluate and how; :func:`validate_config` checks it before any model
loads; :class:`EvalResult` is what a run (or a rebuilt report) hands back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.methods import Method, Sweep, parse_methods, parse_sweep
from proxyalign.eval.metrics import Summary, summarize
from proxyalign.eval.prompts import check_style

__all__ = ["EvalConfig", "EvalResult", "parse_datasets", "validate_config"]


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
    """What :func:`~proxyalign.eval.run_eval` produced: all records of the output directory and their
    summaries."""

    output_dir: Path
    records: list[dict[str, Any]]
    summaries: list[Summary]
    tuned: dict[str, dict[str, Any]]  #: "dataset|method" -> {"param", "value", "dev": {value: accuracy}}
    report_path: Path | None = None
    plot_path: Path | None = None
    new_instances: int = 0

    @classmethod
    def from_records(
        cls,
        output_dir: Path,
        records: list[dict[str, Any]],
        tuned: dict[str, dict[str, Any]],
        new_instances: int = 0,
    ) -> EvalResult:
        """Summaries of ``records``; a method chosen on the dev split is marked on its test rows."""
        summaries = summarize(records)
        for summary in summaries:
            if f"{summary.dataset}|{summary.method}" in tuned and summary.split == "test":
                summary.chosen = True
        return cls(output_dir, records, summaries, tuned, new_instances=new_instances)


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

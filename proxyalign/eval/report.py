"""Reports of an evaluation directory: ``summary.json``, ``report.md`` and ``sweep.png``.

Reports are built from records alone: :func:`write_reports` after a run, :func:`report_directory` from
an evaluation directory on disk (no models needed).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.config import EvalConfig, EvalResult
from proxyalign.eval.metrics import Paired, Summary, paired_comparisons
from proxyalign.eval.store import RECORDS, load_records

__all__ = [
    "markdown_table",
    "paired_table",
    "plot_sweeps",
    "report_directory",
    "write_reports",
]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _method_name(summary: Summary) -> str:
    names = {"base": "p alone (`base`)", "aligned": "q* alone (`aligned`)"}
    name = names.get(summary.method, f"`{summary.method}`")
    return name + (" (tuned on dev)" if summary.chosen else "")


def markdown_table(summaries: Sequence[Summary]) -> str:
    """One Markdown table per dataset and split: accuracy with its 95% Wilson interval and costs."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[Summary]] = defaultdict(list)
    for summary in summaries:
        groups[(summary.dataset, summary.split)].append(summary)
    for (dataset, split), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "test")):
        lines.append(f"### {dataset} ({split})\n")
        lines.append(
            "| method | n | accuracy | 95% CI | rejection rate | from q* | answer found | truncated "
            "| new tokens/q | tokens/s |"
        )
        lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for s in rows:
            rate = _pct(s.rejection_rate)
            if s.rejection_rate is None and s.acceptance_rate is not None:
                rate = f"n/a (spec. accept {_pct(s.acceptance_rate)})"
            tps = "n/a" if s.tokens_per_s is None else f"{s.tokens_per_s:.1f}"
            lines.append(
                f"| {_method_name(s)} | {s.n} | {_pct(s.accuracy)} ({s.correct}/{s.n}) | "
                f"{100 * s.ci_low:.1f}–{100 * s.ci_high:.1f} | {rate} | {_pct(s.from_aligned)} | "
                f"{s.extracted}/{s.n} | {s.truncated} | {s.mean_new_tokens:.0f} | {tps} |"
            )
        lines.append("")
    return "\n".join(lines)


def paired_table(pairs: Sequence[Paired]) -> str:
    """Each method against p alone and q* alone on the same questions: wins, losses, McNemar p."""
    if not pairs:
        return ""
    names = {"base": "p alone", "aligned": "q* alone"}
    lines = [
        "## Paired comparisons\n",
        "Same questions and seeds for every method, so methods are compared question by question: "
        "*+w / -l* counts the questions only the method got right / only the baseline got right, and p "
        "is the exact two-sided McNemar test on those. Above 0.05 this run cannot tell the two apart at "
        "the 5% level; with several comparisons per table, one p just under 0.05 is weak evidence.\n",
        "| dataset | method | baseline | questions | + / - | McNemar p |",
        "|---|---|---|---:|---:|---:|",
    ]
    for pair in pairs:
        method = names.get(pair.method, f"`{pair.method}`")
        lines.append(
            f"| {pair.dataset} ({pair.split}) | {method} | {names.get(pair.baseline, pair.baseline)} | "
            f"{pair.n} | +{pair.wins} / -{pair.losses} | "
            f"{'<0.001' if pair.p_value < 0.001 else f'{pair.p_value:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def _tuning_section(tuned: dict[str, dict[str, Any]]) -> str:
    if not tuned:
        return ""
    lines = [
        "## Tuning on the dev split\n",
        "| dataset | criterion | parameter | dev accuracy per value | chosen |",
    ]
    lines.append("|---|---|---|---|---:|")
    for info in tuned.values():
        grid = ", ".join(f"{value}: {_pct(acc)}" for value, acc in info["dev_accuracy"].items())
        lines.append(
            f"| {info['dataset']} | {info['criterion']} | {info['param']} | {grid} (n={info['dev_size']}) | "
            f"{info['value']:g} |"
        )
    return "\n".join(lines) + "\n"


def _config_section(config: EvalConfig | None) -> str:
    if config is None:
        return ""
    sweeps = ", ".join(str(getattr(s, "text", s)) for s in config.sweeps) or "none"
    return (
        "## Settings\n\n"
        f"- prompts: p `{config.prompts['base']}`, q* `{config.prompts['aligned']}`"
        f"{'' if config.shots is None else f' ({config.shots} shots)'}\n"
        f"- temperature {config.temperature:g}, top-k {config.top_k}, top-p {config.top_p}, "
        f"criterion on {config.criterion_on} probabilities, up to {config.max_new_tokens} new tokens\n"
        f"- mode `{config.mode}` (gamma {config.gamma}), batch size {config.batch_size}, "
        f"seeds {', '.join(str(s) for s in config.seeds)}\n"
        f"- sweeps: {sweeps}; dev questions: {config.dev}\n"
    )


def plot_sweeps(summaries: Sequence[Summary], path: Path) -> Path | None:
    """Accuracy (with 95% intervals) and rejection rate against the swept parameter, per dataset.

    Uses the dev split where a sweep was tuned there, else the test split. p alone / q* alone are drawn
    as horizontal lines when they ran on the same split. Returns None when nothing was swept or
    matplotlib is missing.
    """
    swept = [s for s in summaries if s.sweep_param and not s.chosen]
    if not swept:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return None
    datasets = sorted({s.dataset for s in swept})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        mine = [s for s in swept if s.dataset == dataset]
        split = "dev" if any(s.split == "dev" for s in mine) else "test"
        mine = [s for s in mine if s.split == split]
        acc_ax, rej_ax = axes[row]
        curves: dict[tuple[str, str], list[Summary]] = defaultdict(list)
        for s in mine:
            curves[(s.criterion, s.sweep_param or "")].append(s)
        for (criterion, param), points in curves.items():
            points.sort(key=lambda s: s.params[param])
            xs = [s.params[param] for s in points]
            ys = [100 * s.accuracy for s in points]
            err = [
                [100 * (s.accuracy - s.ci_low) for s in points],
                [100 * (s.ci_high - s.accuracy) for s in points],
            ]
            acc_ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{criterion} ({param})")
            rates = [(s.params[param], s.rejection_rate) for s in points if s.rejection_rate is not None]
            if rates:
                rej_ax.plot(
                    [x for x, _ in rates], [100 * r for _, r in rates], marker="o", label=f"{criterion}"
                )
        for baseline, style in (("base", "--"), ("aligned", ":")):
            for s in summaries:
                if s.dataset == dataset and s.split == split and s.method == baseline:
                    label = "p alone" if baseline == "base" else "q* alone"
                    acc_ax.axhline(100 * s.accuracy, linestyle=style, color="gray", label=label)
        acc_ax.set_title(f"{dataset} ({split}): accuracy")
        acc_ax.set_xlabel("margin / threshold / alpha")
        acc_ax.set_ylabel("accuracy (%)")
        acc_ax.legend(fontsize=8)
        rej_ax.set_title(f"{dataset} ({split}): rejection rate of p's drafts")
        rej_ax.set_xlabel("margin / threshold / alpha")
        rej_ax.set_ylabel("rejection rate (%)")
        if rej_ax.lines:
            rej_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(result: EvalResult, config: EvalConfig | None = None) -> EvalResult:
    """Write ``summary.json`` and ``report.md`` (and ``sweep.png``) for an :class:`EvalResult`."""
    output: Path = result.output_dir
    output.mkdir(parents=True, exist_ok=True)
    pairs = paired_comparisons(result.records)
    payload = {
        "summaries": [s.as_dict() for s in result.summaries],
        "paired": [p.as_dict() for p in pairs],
        "tuned": result.tuned,
    }
    _write_atomic(output / "summary.json", json.dumps(payload, indent=2))
    plot = None
    if config is None or getattr(config, "plot", True):
        plot = plot_sweeps(result.summaries, output / "sweep.png")
    parts = [
        "# Evaluation report\n",
        "Accuracy is exact match after answer extraction; the interval is a 95% Wilson score interval. "
        "Rejection rate: share of p's drafts the criterion rejected (token-level mode only; speculative "
        "modes report q*'s draft acceptance instead). *from q\\**: share of output tokens q* produced. "
        "tokens/s: output tokens per second of a request, decoding beside the others in flight.\n",
        markdown_table(result.summaries),
        paired_table(pairs),
        _tuning_section(result.tuned),
        _config_section(config),
    ]
    if plot is not None:
        parts.append(f"![accuracy and rejection rate against the swept parameter]({plot.name})\n")
    _write_atomic(output / "report.md", "\n".join(p for p in parts if p))
    result.report_path = output / "report.md"
    result.plot_path = plot
    return result


def report_directory(output_dir: str | os.PathLike[str]) -> EvalResult:
    """Rebuild the reports of an evaluation directory from its records alone (no models needed)."""
    output = Path(output_dir)
    if not (output / RECORDS).is_file():
        raise ProxyAlignError(f"{output} holds no evaluation records ({RECORDS}); nothing to report")
    records = load_records(output)
    tuned: dict[str, dict[str, Any]] = {}
    summary_file = output / "summary.json"
    if summary_file.exists():
        tuned = json.loads(summary_file.read_text()).get("tuned", {})
    return write_reports(EvalResult.from_records(output, records, tuned))

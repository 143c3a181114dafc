"""Summaries of per-instance records: accuracy with a Wilson interval, rejection rate, tokens/s."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Paired", "Summary", "mcnemar_exact", "paired_comparisons", "summarize", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); ``(0, 1)`` when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n, which
    matters for 50-question runs.
    """
    if n <= 0:
        return 0.0, 1.0
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Summary:
    """One row of a report: a dataset, split, method (criterion and parameters) over its instances."""

    dataset: str
    split: str
    method: str
    criterion: str
    params: dict[str, float]
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    extracted: int  #: instances where an answer could be extracted at all
    rejection_rate: float | None  #: rejected drafts of p / drafts of p (token level); None if no drafts
    acceptance_rate: float | None  #: speculative modes: accepted drafts of q* / drafts checked by p
    from_aligned: float | None  #: share of output tokens produced by q*
    new_tokens: int
    mean_new_tokens: float
    tokens_per_s: float | None  #: output tokens per second of each request, decoding beside the others
    truncated: int  #: instances that hit max_new_tokens
    seeds: tuple[int, ...]
    modes: tuple[str, ...]
    sweep_param: str | None = None  #: the parameter a sweep varied for this method, if any
    chosen: bool = False  #: the value a dev sweep picked

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _method_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return record["dataset"], record["split"], record["method"]


def _tokens_per_s(items: Sequence[Mapping[str, Any]], stats: Sequence[Mapping[str, Any]]) -> float | None:
    """Output tokens per second a request saw (its tokens over its own time, decoding in the shared
    batch). Records of older runs, decoded in fixed batches, carry their batch's wall time instead."""
    batches: dict[str, tuple[int, float]] = {}
    for r in items:
        batch = r.get("batch") or {}
        if batch.get("uid"):
            batches[batch["uid"]] = (int(batch.get("new_tokens", 0)), float(batch.get("elapsed_s", 0.0)))
    if batches:
        elapsed = sum(e for _, e in batches.values())
        return sum(t for t, _ in batches.values()) / elapsed if elapsed > 0 else None
    elapsed = sum(float(s.get("elapsed_s", 0.0)) for s in stats)
    return sum(int(s.get("new_tokens", 0)) for s in stats) / elapsed if elapsed > 0 else None


def summarize(records: Iterable[Mapping[str, Any]]) -> list[Summary]:
    """One :class:`Summary` per (dataset, split, method label), in first-seen order."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[_method_key(record)].append(record)
    rows = []
    for (dataset, split, method), items in groups.items():
        n = len(items)
        correct = sum(bool(r["correct"]) for r in items)
        low, high = wilson_interval(correct, n)
        stats = [r.get("stats") or {} for r in items]
        modes = tuple(sorted({str(r.get("mode", "token")) for r in items}))
        token_level = [s for s, r in zip(stats, items, strict=True) if r.get("mode", "token") == "token"]
        speculative = [s for s, r in zip(stats, items, strict=True) if r.get("mode", "token") != "token"]
        drafts = sum(s.get("drafts", 0) for s in token_level)
        rejected = sum(s.get("rejected_drafts", 0) for s in token_level)
        spec_drafts = sum(s.get("drafts", 0) for s in speculative)
        spec_rejected = sum(s.get("rejected_drafts", 0) for s in speculative)
        new_tokens = sum(s.get("new_tokens", 0) for s in stats)
        from_aligned = sum(s.get("tokens_from_aligned", 0) for s in stats)
        tokens_per_s = _tokens_per_s(items, stats)
        first = items[0]
        rows.append(
            Summary(
                dataset=dataset,
                split=split,
                method=method,
                criterion=first["criterion"],
                params=dict(first.get("params") or {}),
                n=n,
                correct=correct,
                accuracy=correct / n if n else 0.0,
                ci_low=low,
                ci_high=high,
                extracted=sum(r.get("extracted") is not None for r in items),
                rejection_rate=rejected / drafts if drafts else None,
                acceptance_rate=1 - spec_rejected / spec_drafts if spec_drafts else None,
                from_aligned=from_aligned / new_tokens if new_tokens else None,
                new_tokens=new_tokens,
                mean_new_tokens=new_tokens / n if n else 0.0,
                tokens_per_s=tokens_per_s,
                truncated=sum(r.get("finish_reason") == "length" for r in items),
                seeds=tuple(sorted({int(r["seed"]) for r in items})),
                modes=modes,
                sweep_param=first.get("sweep_param"),
                chosen=bool(first.get("chosen", False)),
            )
        )
    return rows


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: are ``wins`` vs ``losses`` (discordant pairs) a fair coin?

    The right test for two methods run on the same questions: only the questions where exactly one of
    them is right carry information, and under "no difference" each falls either way with probability
    1/2. Overlapping Wilson intervals, by contrast, say little about a paired difference.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class Paired:
    """A method against a baseline on the questions (and seeds) both answered."""

    dataset: str
    split: str
    method: str
    baseline: str
    n: int  #: questions both answered
    wins: int  #: the method right, the baseline wrong
    losses: int  #: the baseline right, the method wrong
    p_value: float  #: exact McNemar

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparisons(
    records: Iterable[Mapping[str, Any]], baselines: tuple[str, ...] = ("base", "aligned")
) -> list[Paired]:
    """Every method against each baseline that ran on the same dataset and split, question by question."""
    correct: dict[tuple[str, str, str], dict[tuple[str, int], bool]] = defaultdict(dict)
    for record in records:
        question = (str(record["id"]), int(record["seed"]))
        correct[_method_key(record)][question] = bool(record["correct"])
    rows = []
    for (dataset, split, method), answers in correct.items():
        for baseline in baselines:
            reference = correct.get((dataset, split, baseline))
            # a baseline meets each baseline listed before it once, and never itself
            earlier = method in baselines and baselines.index(method) <= baselines.index(baseline)
            if reference is None or earlier:
                continue
            shared = answers.keys() & reference.keys()
            wins = sum(answers[q] and not reference[q] for q in shared)
            losses = sum(reference[q] and not answers[q] for q in shared)
            p_value = mcnemar_exact(wins, losses)
            rows.append(Paired(dataset, split, method, baseline, len(shared), wins, losses, p_value))
    return rows

"""Logits -> float32 distributions, with each row's own temperature, top-k, top-p and criterion view.

Where things happen (design §1): each model's logits are cut to the tokenizer's real vocabulary (padded
embedding rows get zero mass), divided by the row's temperature, and filtered by its top-k / top-p
*once*, per model, before any criterion or mixing. The small base model q is a reference in a ratio,
never a proposer, so it is tempered but not filtered. With ``criterion_on="raw"`` (and always under
greedy decoding) the criterion instead sees the untempered, unfiltered distribution, while sampling
still uses the tempered, filtered one.

Rows of one batch belong to different requests, so every setting is a per-row tensor
(:class:`RowSampling`); nothing loops over rows or over the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from proxyalign.errors import InvalidParameterError

__all__ = ["Dists", "RowSampling", "SamplingConfig", "logits_to_probs", "model_dists"]

CriterionOn = Literal["scaled", "raw"]
#: Temperatures below this decode greedily: float32 logits divided by a tinier one can overflow to inf.
MIN_TEMPERATURE = 1e-4
#: top_p of a row that does not filter: above any cumulative sum, so rounding can never drop a token.
_NO_TOP_P = 2.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling settings of one request."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    criterion_on: CriterionOn = "scaled"

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidParameterError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise InvalidParameterError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (
            not _is_number(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1
        ):
            raise InvalidParameterError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")
        if self.criterion_on not in ("scaled", "raw"):
            raise InvalidParameterError(f"criterion_on must be 'scaled' or 'raw', got {self.criterion_on!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small (below :data:`MIN_TEMPERATURE`) that dividing float32 logits by
        it would overflow: both take the argmax."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def filters(self) -> bool:
        return (self.top_k is not None) or (self.top_p is not None and self.top_p < 1)

    @property
    def raw_view(self) -> bool:
        """Whether the criterion reads the untempered, unfiltered distribution (greedy: always)."""
        return self.criterion_on == "raw" or self.greedy


@dataclass(frozen=True)
class RowSampling:
    """The sampling settings of every row of a batch, as tensors on the batch's device.

    ``top_k`` (0 = off) and ``top_p`` (2.0 = off) are None when no row uses them, so the common case
    costs no sort. Greedy rows are tempered by 1 (an argmax ignores temperature).
    """

    temperature: torch.Tensor  #: [N] float32, greedy rows 1
    top_k: torch.Tensor | None  #: [N] long
    top_p: torch.Tensor | None  #: [N] float32
    raw_view: torch.Tensor | None  #: [N] bool: the criterion reads the raw distribution
    greedy: torch.Tensor | None  #: [N] bool, None when no row is greedy
    all_greedy: bool = False

    @classmethod
    def from_configs(cls, configs: Sequence[SamplingConfig], device: torch.device | str) -> RowSampling:
        temps = [1.0 if c.greedy else float(c.temperature) for c in configs]  # greedy: argmax, any scale
        top_k = [c.top_k or 0 for c in configs]
        top_p = [float(c.top_p) if c.top_p is not None and c.top_p < 1 else _NO_TOP_P for c in configs]
        raw = [c.raw_view and ((not c.greedy and c.temperature != 1) or c.filters) for c in configs]
        greedy = [c.greedy for c in configs]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            temperature=tensor(temps, torch.float32),
            top_k=tensor(top_k, torch.long) if any(top_k) else None,
            top_p=tensor(top_p, torch.float32) if any(p < 1 for p in top_p) else None,
            raw_view=tensor(raw, torch.bool) if any(raw) else None,
            greedy=tensor(greedy, torch.bool) if any(greedy) else None,
            all_greedy=bool(greedy) and all(greedy),
        )

    @cached_property
    def tempered(self) -> bool:
        return bool((self.temperature != 1).any())

    @property
    def filters(self) -> bool:
        return self.top_k is not None or self.top_p is not None

    def repeat(self, n: int) -> RowSampling:
        """Each row's settings ``n`` times in a row: for ``[B * n]`` positions flattened row-major."""
        if n == 1:
            return self

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(n)

        return RowSampling(
            rep(self.temperature),  # type: ignore[arg-type]
            rep(self.top_k),
            rep(self.top_p),
            rep(self.raw_view),
            rep(self.greedy),
            self.all_greedy,
        )

    def select(self, index: torch.Tensor) -> RowSampling:
        """The settings of some rows (``index``: positions on the settings' device)."""

        def sel(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index)

        greedy = sel(self.greedy)
        return RowSampling(
            sel(self.temperature),  # type: ignore[arg-type]
            sel(self.top_k),
            sel(self.top_p),
            sel(self.raw_view),
            greedy,
            self.all_greedy,
        )

    def unfiltered(self) -> RowSampling:
        """The same rows without top-k / top-p (for the small base model q, never a proposer)."""
        return RowSampling(self.temperature, None, None, self.raw_view, self.greedy, self.all_greedy)


def _filter(scores: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Per-row top-k (ties with the k-th score kept), then top-p on what is left (at least one token)."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    if top_k is not None:
        vocab = scores.shape[-1]
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = ordered.gather(-1, (k - 1).unsqueeze(-1))
        scores = scores.masked_fill(scores < kth, float("-inf"))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if top_p is not None:
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p.unsqueeze(-1)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


class Dists:
    """One model's next-token distributions for ``N`` rows: as sampled from, and as a criterion reads them.

    ``probs`` is tempered and filtered (what tokens are drawn from); ``view`` is what the criterion
    sees (``probs``, or the raw softmax for rows with a raw view). Log-probabilities are computed on
    first use, exactly (``log_softmax`` of the scores, never ``log`` of an underflowed probability).
    ``allowed`` (``bool [N, V]``, or None) is the grammar mask already applied: disallowed tokens have
    zero mass in both views, and a criterion's output there is ignored (see engine.hybrid).
    """

    def __init__(
        self,
        scores: torch.Tensor,
        raw: torch.Tensor,
        raw_view: torch.Tensor | None,
        allowed: torch.Tensor | None = None,
    ) -> None:
        self._scores = scores
        self._raw = raw
        self._raw_view = raw_view
        self.allowed = allowed

    @classmethod
    def from_probs(cls, probs: torch.Tensor) -> Dists:
        """Distributions given as probabilities (tests, the conformance kit): ``probs`` and ``view`` are
        the very tensor given; log-probabilities are its logs."""
        scores = torch.log(probs)
        dists = cls(scores, scores, None)
        dists.__dict__["probs"] = probs
        dists.__dict__["logprobs"] = scores
        return dists

    @cached_property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self._scores, dim=-1)

    @cached_property
    def logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self._scores, dim=-1)

    @cached_property
    def view(self) -> torch.Tensor:
        if self._raw_view is None:
            return self.probs
        return torch.where(self._raw_view.unsqueeze(-1), torch.softmax(self._raw, dim=-1), self.probs)

    @cached_property
    def view_logprobs(self) -> torch.Tensor:
        if self._raw_view is None:
            return self.logprobs
        raw = torch.log_softmax(self._raw, dim=-1)
        return torch.where(self._raw_view.unsqueeze(-1), raw, self.logprobs)

    @property
    def rows(self) -> int:
        return self._scores.shape[0]

    @classmethod
    def stack(cls, steps: Sequence[Dists]) -> Dists:
        """Per-position ``[B, V]`` distributions -> ``[B * len(steps), V]``, row-major by batch row."""
        n = len(steps)

        def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors, dim=1).flatten(0, 1)

        first = steps[0]
        raw_view = None if first._raw_view is None else first._raw_view.repeat_interleave(n)
        allowed = None
        if any(d.allowed is not None for d in steps):
            allowed = flat(
                [torch.ones_like(d._raw, dtype=torch.bool) if d.allowed is None else d.allowed for d in steps]
            )
        stacked = cls(flat([d._scores for d in steps]), flat([d._raw for d in steps]), raw_view, allowed)
        for name in ("probs", "logprobs", "view", "view_logprobs"):
            if all(name in d.__dict__ for d in steps):
                stacked.__dict__[name] = flat([d.__dict__[name] for d in steps])
        return stacked

    def where(self, keep: torch.Tensor, other: Dists) -> Dists:
        """Rows of ``self`` where ``keep`` (``[N]`` bool), of ``other`` elsewhere (same settings)."""
        rows = keep.unsqueeze(-1)
        allowed = None
        if self.allowed is not None and other.allowed is not None:
            allowed = torch.where(rows, self.allowed, other.allowed)
        return Dists(
            torch.where(rows, self._scores, other._scores),
            torch.where(rows, self._raw, other._raw),
            self._raw_view,
            allowed,
        )

    def select(self, index: torch.Tensor) -> Dists:
        """The distributions of some rows (a criterion group, a position per row)."""
        raw_view = None if self._raw_view is None else self._raw_view.index_select(0, index)
        allowed = None if self.allowed is None else self.allowed.index_select(0, index)
        picked = Dists(
            self._scores.index_select(0, index), self._raw.index_select(0, index), raw_view, allowed
        )
        for name in ("probs", "logprobs", "view", "view_logprobs"):
            if name in self.__dict__:  # computed already: slice it rather than recompute
                picked.__dict__[name] = self.__dict__[name].index_select(0, index)
        return picked


def model_dists(
    logits: torch.Tensor,
    vocab_size: int,
    rows: RowSampling,
    *,
    proposer: bool = True,
    allowed: torch.Tensor | None = None,
) -> Dists:
    """Distributions of one model's logits (``[N, V_model]`` -> ``[N, V]``), each row with its settings.

    ``allowed`` (``bool [N, V]``): a grammar's mask, applied first, so temperature, top-k/top-p and
    every view of the distribution renormalise over the allowed tokens only.
    """
    raw = logits[..., :vocab_size].float()
    if allowed is not None:
        raw = raw.masked_fill(~allowed, float("-inf"))
    scores = raw / rows.temperature.unsqueeze(-1) if rows.tempered else raw
    if proposer and rows.filters:
        scores = _filter(scores, rows.top_k, rows.top_p)
    return Dists(scores, raw, rows.raw_view, allowed)


def logits_to_probs(
    logits: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Float32 probabilities over the first ``vocab_size`` ids of ``logits`` (``[..., V_model]``), with one
    setting for every row. ``temperature == 0`` is treated as 1 (greedy callers take an argmax)."""
    config = SamplingConfig(temperature, top_k, top_p)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = RowSampling.from_configs([config] * flat.shape[0], flat.device)
    return model_dists(flat, vocab_size, rows).probs.reshape(*logits.shape[:-1], vocab_size)

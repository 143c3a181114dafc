"""Lanes: groups of running rows that share forward passes, and the token-level lane.

The engine keeps one lane per kind of decoding and set of models (:func:`~proxyalign.engine.request.
lane_key`): token-level rows over (p, q*), over (p, q*, q), over q* alone, and speculative rows alike.
Within a lane every row has its own sampling settings, criterion and random stream; rows that share a
criterion are evaluated together (a *group*), and each row samples exactly its own distribution.

A lane's step advances every row by one token (token level) or one round (speculative) and returns a
:class:`RowStep` per row. A criterion that fails or returns invalid values fails only its own rows
(``RowStep.error``); the others decode on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from proxyalign.criteria.base import Criterion, CriterionKind
from proxyalign.engine.constraint import RowConstraint, grammar_masks
from proxyalign.engine.gamma import GammaSchedule
from proxyalign.engine.hybrid import (
    Checked,
    criterion_error,
    draft_from_p,
    pick,
    rejection_of,
    role_dists,
    sample_target,
    target_of,
)
from proxyalign.engine.request import LaneKey, Request
from proxyalign.engine.results import CODE, Source
from proxyalign.engine.runner import ModelRunner
from proxyalign.engine.sampling import Dists, RowSampling
from proxyalign.errors import CriterionError
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE

__all__ = ["Group", "Lane", "LaneRow", "RowStep", "TokenLane"]


@dataclass
class LaneRow:
    """A running request inside a lane: its inputs, random stream and progress."""

    request: Request
    ticket: Any  #: the engine's handle of the request (opaque here)
    generator: torch.Generator
    length: int  #: tokens the lead model has seen or queued: prompt + produced
    schedule: GammaSchedule | None = None
    produced: int = 0
    forwards_at_join: tuple[int, int] = (0, 0)
    constraint: RowConstraint | None = None  #: the row's grammar state, if its output is constrained
    policy_state: Any = None  #: what mode="auto"'s policy tracks for this row

    def uniforms(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)


@dataclass
class RowStep:
    """What one step produced for one row (tokens in order, with their source codes) and its counters."""

    tokens: list[int] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    drafted: int = 0
    rejected: int = 0
    pgm_checked: int = 0
    pgm_holds: int = 0
    error: Exception | None = None
    choice: Any = None  #: mode="auto": the lane's :class:`~proxyalign.engine.auto.Choice` for this step


@dataclass(frozen=True)
class Group:
    """Rows of a lane that share one criterion; ``index`` is None when they are all the lane's rows."""

    criterion: Criterion
    rows: tuple[int, ...]
    index: torch.Tensor | None

    def take(self, dists: Dists | None, per_row: int = 1) -> Dists | None:
        """These rows' distributions (``per_row`` consecutive positions per row when flattened)."""
        if dists is None or self.index is None:
            return dists
        return dists.select(self.positions(per_row))

    def positions(self, per_row: int = 1) -> torch.Tensor:
        assert self.index is not None
        if per_row == 1:
            return self.index
        offsets = torch.arange(per_row, device=self.index.device)
        return (self.index.unsqueeze(-1) * per_row + offsets).flatten()

    def put(self, full: torch.Tensor, part: torch.Tensor, per_row: int = 1) -> torch.Tensor:
        """Write this group's values into a tensor over all rows (in place where a subset)."""
        if self.index is None:
            return part
        return full.index_copy_(0, self.positions(per_row), part)


class Lane:
    """Rows that decode together over the same models; subclasses define the step."""

    def __init__(
        self, key: LaneKey, models: dict[str, Any], vocab_size: int, pad_id: int, window: int | None
    ) -> None:
        self.key = key
        self.roles = key[1]
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.window = window
        self.rows: list[LaneRow] = []
        self.runners: dict[str, ModelRunner] = {}
        self.models = {role: models[role] for role in self.roles}
        self.lead = BASE if BASE in self.roles else ALIGNED
        self.device: torch.device | None = None
        self.allowed: torch.Tensor | None = None  #: this step's grammar masks (None: no row constrained)

    def __len__(self) -> int:
        return len(self.rows)

    # -- membership -------------------------------------------------------------------------------
    def join(self, rows: Sequence[LaneRow], runners: dict[str, ModelRunner]) -> None:
        """Add prefilled rows (their runners hold their prompts, the last token queued)."""
        if not self.runners:
            self.runners = runners
            self.device = runners[self.lead].device
        else:
            for role, runner in runners.items():
                self.runners[role].join(runner, self.pad_id)
        counts = self.forward_counts()
        for row in rows:
            row.forwards_at_join = counts
        self.rows.extend(rows)
        self._changed()

    def retain(self, keep: Sequence[int]) -> None:
        """Go on with only these rows (indices into :attr:`rows`, in order)."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(list(keep), dtype=torch.long)
        for runner in self.runners.values():
            runner.retain(index)
        self.rows = [self.rows[i] for i in keep]
        self._changed()

    def _changed(self) -> None:
        for name in ("sampling", "groups", "constrained"):
            self.__dict__.pop(name, None)

    @cached_property
    def sampling(self) -> RowSampling:
        assert self.device is not None
        return RowSampling.from_configs([row.request.sampling for row in self.rows], self.device)

    @cached_property
    def groups(self) -> list[Group]:
        """Rows grouped by criterion (equal criteria: same class and parameters), in order of first row."""
        members: dict[Criterion, list[int]] = {}
        for i, row in enumerate(self.rows):
            members.setdefault(row.request.criterion, []).append(i)
        if len(members) == 1:
            ((criterion, rows),) = members.items()
            return [Group(criterion, tuple(rows), None)]
        assert self.device is not None
        return [
            Group(c, tuple(rows), torch.tensor(rows, dtype=torch.long, device=self.device))
            for c, rows in members.items()
        ]

    def forward_counts(self) -> tuple[int, int]:
        """Forward passes of (p, q*) this lane has run so far."""
        return tuple(self.runners[r].forwards if r in self.runners else 0 for r in (BASE, ALIGNED))  # type: ignore[return-value]

    # -- helpers for steps ------------------------------------------------------------------------
    def _dists(
        self, role: str, logits: torch.Tensor, sampling: RowSampling, allowed: torch.Tensor | None = None
    ) -> Dists:
        return role_dists(role, logits.to(self.device, non_blocking=True), self.vocab_size, sampling, allowed)

    def _next(self, role: str) -> Dists:
        return self._dists(role, self.runners[role].next_logits(), self.sampling, self.allowed)

    @cached_property
    def constrained(self) -> bool:
        return any(row.constraint is not None for row in self.rows)

    def _masks(self, errors: dict[int, Exception]) -> torch.Tensor | None:
        """The rows' grammar masks for the next position; rows whose grammar allows nothing fail."""
        if not self.constrained:
            return None
        masks, failed = grammar_masks([row.constraint for row in self.rows], self.vocab_size, self.device)
        for b, error in failed.items():
            errors.setdefault(b, error)
        return masks

    def _advance_grammars(self, tokens: Sequence[int], errors: dict[int, Exception]) -> None:
        """Move each constrained row's grammar over the token it emitted this step."""
        for b, row in enumerate(self.rows):
            if row.constraint is not None and b not in errors:
                error = row.constraint.advance([tokens[b]])
                if error is not None:
                    errors[b] = error

    def _uniforms(self, counts: Sequence[int], width: int, fill: float) -> torch.Tensor:
        """``[B, width]`` uniforms: row b's first ``counts[b]`` from its own generator, ``fill`` after."""
        out = torch.full((len(self.rows), width), fill, dtype=torch.float64)
        for b, (row, n) in enumerate(zip(self.rows, counts, strict=True)):
            if n:
                out[b, :n] = row.uniforms(n)
        return out.to(self.device, non_blocking=True)

    def _guard(
        self,
        group: Group,
        errors: dict[int, Exception],
        compute: Callable[[], Checked],
        checks: list[tuple[Group, Checked]],
    ) -> Checked | None:
        """Evaluate a group's criterion; a failure fails the group's rows, not the step."""
        try:
            checked = compute()
        except CriterionError as exc:
            for row in group.rows:
                errors[row] = exc
            return None
        checks.append((group, checked))
        return checked

    @staticmethod
    def _report(
        checks: list[tuple[Group, Checked]], flags: Sequence[int], errors: dict[int, Exception]
    ) -> None:
        """Turn the device's invalid-output flags (read with the step's host transfer) into row errors."""
        for (group, checked), bad in zip(checks, flags, strict=True):
            if bad:
                error = criterion_error(group.criterion, checked)
                for row in group.rows:
                    errors.setdefault(row, error)

    def step(self) -> list[RowStep]:
        raise NotImplementedError


class TokenLane(Lane):
    """One token per row per step from its criterion's hybrid distribution.

    Three paths, one output distribution each: *lazy* (criteria that read only p: draft from p, run q*
    only when some row's draft is rejected), *eager* (criteria that read q* or q: every model every
    step, two-stage sampling), and *target* (target-defined criteria: two stages where the target is a
    rejection PGM, a direct draw elsewhere). Every row uses three uniforms of its own per step.
    """

    @cached_property
    def _kinds(self) -> tuple[list[Group], list[Group], list[Group]]:
        by_kind = {kind: [g for g in self.groups if g.criterion.kind is kind] for kind in CriterionKind}
        return by_kind[CriterionKind.LAZY], by_kind[CriterionKind.EAGER], by_kind[CriterionKind.TARGET]

    def _changed(self) -> None:
        super()._changed()
        self.__dict__.pop("_kinds", None)

    def step(self) -> list[RowStep]:
        b = len(self.rows)
        u = self._uniforms([3] * b, 3, 0.5)
        errors: dict[int, Exception] = {}
        checks: list[tuple[Group, Checked]] = []
        self.allowed = self._masks(errors)
        if BASE not in self.runners:  # q* alone
            tokens = pick(self._next(ALIGNED).probs, u[:, 2], self.sampling.greedy)
            ones = torch.ones_like(tokens)
            columns = [tokens, ones * CODE[Source.ALIGNED], ones, ones, ones * 0, ones * 0]
        else:
            columns = self._hybrid(u, errors, checks)
        for runner in self.runners.values():
            runner.push(columns[0])
        flags = (
            torch.stack([c.to(columns[0].device) for c in (check.invalid for _, check in checks)])
            if checks
            else None
        )
        packed = torch.cat(
            [torch.stack(columns).flatten().long(), *([flags.long()] if flags is not None else [])]
        ).tolist()
        self._report(checks, packed[6 * b :], errors)
        tokens, codes, drafted, rejected, checked, holds = (packed[i * b : (i + 1) * b] for i in range(6))
        if self.allowed is not None:
            self._advance_grammars(tokens, errors)
        for row in self.rows:
            row.produced += 1
            row.length += 1
        return [
            RowStep([tokens[i]], [codes[i]], drafted[i], rejected[i], checked[i], holds[i], errors.get(i))
            for i in range(b)
        ]

    def _hybrid(
        self, u: torch.Tensor, errors: dict[int, Exception], checks: list[tuple[Group, Checked]]
    ) -> list[torch.Tensor]:
        lazy, eager, target = self._kinds
        greedy = self.sampling.greedy
        p = self._next(BASE)
        mu = torch.zeros_like(p.probs)
        for group in lazy:
            checked = self._guard(
                group, errors, lambda g=group: rejection_of(g.criterion, g.take(p), None, None), checks
            )
            if checked is not None:
                mu = group.put(mu, checked.tensor)
        w, rejected = draft_from_p(p.probs, mu, u, greedy)
        need_q_star = bool(eager or target)
        if not need_q_star:
            # The one extra host sync of the lazy path: does any row need q* this step?
            need_q_star = bool(rejected.any())
        zeros = torch.zeros_like(w)
        if not need_q_star:
            return [w, zeros, torch.ones_like(w), zeros, zeros, zeros]
        q_star = self._next(ALIGNED)
        q = self._next(SMALL_BASE) if SMALL_BASE in self.runners else None
        for group in eager:
            compute = lambda g=group: rejection_of(g.criterion, g.take(p), g.take(q_star), g.take(q))  # noqa: E731
            checked = self._guard(group, errors, compute, checks)
            if checked is not None:
                mu = group.put(mu, checked.tensor)
        if eager:
            w, rejected = draft_from_p(p.probs, mu, u, greedy)  # the same draft w: same p, same uniform
        tokens = torch.where(rejected, pick(q_star.probs, u[:, 2], greedy), w)
        codes, drafted, checked_rows, holds = (
            rejected.long(),
            torch.ones_like(w),
            zeros.clone(),
            zeros.clone(),
        )
        rejected = rejected.long()
        for group in target:
            compute = lambda g=group: target_of(g.criterion, g.take(p), g.take(q_star), g.take(q))  # noqa: E731
            checked = self._guard(group, errors, compute, checks)
            pi = checked.tensor if checked is not None else group.take(p).probs  # type: ignore[union-attr]
            sub_u = u if group.index is None else u.index_select(0, group.index)
            sub_greedy = (
                greedy if greedy is None or group.index is None else greedy.index_select(0, group.index)
            )
            draw = sample_target(group.take(p).probs, group.take(q_star).probs, pi, sub_u, sub_greedy)  # type: ignore[union-attr]
            tokens = group.put(tokens, draw.tokens)
            codes = group.put(codes, draw.codes)
            drafted = group.put(drafted, draw.drafted.long())
            rejected = group.put(rejected, draw.rejected.long())
            checked_rows = group.put(checked_rows, torch.ones_like(draw.tokens))
            holds = group.put(holds, draw.drafted.long())
        return [tokens, codes, drafted, rejected, checked_rows, holds]

"""The speculative lane: q* drafts, p checks every draft in one forward, each row samples exactly pi.

One round (design §1, "Exact speculative hybrid"), for every row at once:

1. q* drafts ``G = max_b gamma_b`` tokens per row (tempered and filtered as at token level); row b uses
   only its own first ``gamma_b`` (its own schedule, cut to what it still needs);
2. p (and q, when the target reads it) scores the ``G + 1`` positions in one forward pass;
3. draft ``x_i`` of row b is accepted with ``min(1, pi_i(x_i) / q*_i(x_i))``; at the first rejection
   a token is drawn from ``norm(max(0, pi_i - q*_i))``; if all ``gamma_b`` drafts passed, a bonus
   token is drawn from ``pi_{gamma_b}`` (q* steps once more only for rows with ``gamma_b = G``).

Each row draws ``2 gamma_b + 1`` uniforms of its own per round, so its tokens do not depend on the rows
beside it. Caches stay rectangular: :meth:`ModelRunner.rewind` crops every row to the longest accepted
run and masks shorter rows' rejected drafts out as holes. There is one host transfer per round, and a
second one in rounds where a row needs q*'s extra step.

Variants: ``sss_literal`` lanes use the SSS paper's literal rule (approximate, see
:func:`proxyalign.mixture.sss_literal_acceptance`); greedy rows (temperature 0) speculate greedily,
reproducing token-level greedy decoding token for token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from proxyalign import mixture
from proxyalign.engine.gamma import GammaSchedule
from proxyalign.engine.hybrid import Checked, greedy_from, hybrid_target, pick, verify_drafts, verify_greedy
from proxyalign.engine.lanes import Group, Lane, LaneRow, RowStep
from proxyalign.engine.request import LaneKey
from proxyalign.engine.results import CODE, Source
from proxyalign.engine.sampling import Dists
from proxyalign.errors import CriterionError
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE

__all__ = ["SpeculativeLane"]


def _size(model: torch.nn.Module) -> int:
    """Parameter count: a proxy for a forward pass's cost at small batch (weights are read once)."""
    return sum(p.numel() for p in model.parameters())


class SpeculativeLane(Lane):
    """Advances every row by one speculative round: 1 to ``gamma_b + 1`` tokens per row per step."""

    def __init__(
        self, key: LaneKey, models: dict[str, Any], vocab_size: int, pad_id: int, window: int | None
    ) -> None:
        super().__init__(key, models, vocab_size, pad_id, window)
        self.literal = key[0] == "sss_literal"
        self.cost_ratio = _size(self.models[ALIGNED]) / _size(self.models[BASE])

    def join(self, rows: Sequence[LaneRow], runners: dict) -> None:
        for row in rows:
            schedule = GammaSchedule.parse(row.request.gamma)
            if schedule.adaptive:
                schedule = dataclasses.replace(schedule, cost_ratio=self.cost_ratio)
                schedule.value = schedule.best(schedule.acceptance)
            row.schedule = schedule
        super().join(rows, runners)

    def _gammas(self) -> list[int]:
        """Each row's drafts this round: its schedule's, cut to what it still needs and to the window."""
        gammas = []
        for row in self.rows:
            assert row.schedule is not None
            gammas.append(max(0, min(row.schedule.value, row.request.max_new_tokens - row.produced - 1)))
        if self.window is not None and gammas:
            room = min(self.window - row.length for row in self.rows)
            gammas = [max(0, min(g, room)) for g in gammas]
        return gammas

    def _round_uniforms(self, gammas: list[int], g: int) -> torch.Tensor:
        """``[B, 2G + 1]``: draft uniforms, acceptance uniforms, and the round's last draw per row."""
        out = torch.full((len(self.rows), 2 * g + 1), 0.5, dtype=torch.float64)
        for b, (row, n) in enumerate(zip(self.rows, gammas, strict=True)):
            u = row.uniforms(2 * n + 1)
            out[b, :n] = u[:n]
            out[b, g : g + n] = u[n : 2 * n]
            out[b, 2 * g] = u[2 * n]
        return out.to(self.device, non_blocking=True)

    # -- one round -------------------------------------------------------------------------------
    def step(self) -> list[RowStep]:
        gammas = self._gammas()
        b, g = len(self.rows), max(gammas, default=0)
        u = self._round_uniforms(gammas, g)
        limit = torch.tensor(gammas, device=self.device)
        errors: dict[int, Exception] = {}
        checks: list[tuple[Group, Checked]] = []
        self.allowed = None  # set per position by _draft when rows are constrained
        steps, drafts, masks = self._draft(g, u, errors)
        p_all, q_all = self._score(drafts, g, masks)
        q_star = Dists.stack(steps) if g else None
        n, draft_codes = self._check(drafts, p_all, q_star, q_all, u[:, g : 2 * g], limit, errors, checks)
        rows = torch.arange(b, device=self.device)
        final_p = p_all.select(rows * (g + 1) + n)
        final_q = q_all.select(rows * (g + 1) + n) if q_all is not None else None
        final_q_star = q_star.select(rows * g + n.clamp(max=g - 1)) if q_star is not None else None
        if final_q_star is not None:
            # Rows that passed every draft need q* at position g, computed below; until then p stands
            # in (their result here is discarded), so the criterion never sees q* and p at different
            # positions (different grammar masks or filters: a target of NaN, flagged as invalid).
            final_q_star = final_q_star.where(n < g, final_p)
            token, code = self._final(final_p, final_q_star, final_q, n < limit, u[:, 2 * g], errors, checks)
        else:
            token = code = torch.zeros_like(n)
        packed = self._transfer(n, token, code, drafts, draft_codes, checks)
        self._report(checks, packed[3 * b + 2 * b * g :], errors)
        accepted, tokens, codes = packed[:b], packed[b : 2 * b], packed[2 * b : 3 * b]
        extra = [i for i in range(b) if accepted[i] == g]
        if extra:  # rows that passed all G drafts need q* one position further
            runner = self.runners[ALIGNED]
            self.allowed = masks[g] if masks else None
            if g:
                runner.push(drafts[:, -1])
            final_q_star = Dists.stack([*steps, self._next(ALIGNED)]).select(rows * (g + 1) + n)
            first = len(checks)
            token, code = self._final(final_p, final_q_star, final_q, n < limit, u[:, 2 * g], errors, checks)
            more = torch.cat([token, code, *(c.invalid.view(1).long() for _, c in checks[first:])]).tolist()
            self._report(checks[first:], more[2 * b :], errors)
            for i in extra:
                tokens[i], codes[i] = more[i], more[b + i]
        self._roll_back(n, accepted, tokens, g, q_star_stepped=bool(extra))
        if masks:
            self._settle_grammars(accepted, tokens, errors)
        drafted_rows = packed[3 * b : 3 * b + b * g]
        code_rows = packed[3 * b + b * g : 3 * b + 2 * b * g]
        out = []
        for i, row in enumerate(self.rows):
            k, gamma = accepted[i], gammas[i]
            row.produced += k + 1
            row.length += k + 1
            assert row.schedule is not None
            row.schedule.update([k], gamma)
            ids = [*drafted_rows[i * g : i * g + k], tokens[i]]
            sources = [*code_rows[i * g : i * g + k], codes[i]]
            out.append(RowStep(ids, sources, k + (k < gamma), int(k < gamma), 0, 0, errors.get(i)))
        return out

    def _draft(
        self, g: int, u: torch.Tensor, errors: dict[int, Exception]
    ) -> tuple[list[Dists], torch.Tensor, list[torch.Tensor | None]]:
        """q*'s distributions at the ``g`` draft positions and its drafts ``[B, g]``; q* is fed the first
        ``g - 1`` drafts (the last one only if some row needs the bonus position).

        With constrained rows, also the grammar masks of the ``g + 1`` positions (empty otherwise): each
        draft is sent to the host to advance its row's grammar (:meth:`RowConstraint.draft`), the one
        extra transfer per draft that constrained decoding costs.
        """
        runner = self.runners[ALIGNED]
        steps: list[Dists] = []
        drafts: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        for i in range(g):
            if i:
                runner.push(drafts[-1])
            if self.constrained:
                if i:
                    self._draft_grammars(drafts[-1].tolist(), errors)
                masks.append(self._masks(errors))
                self.allowed = masks[-1]
            steps.append(self._next(ALIGNED))
            drafts.append(pick(steps[-1].probs, u[:, i], self.sampling.greedy))
        if self.constrained:
            if drafts:
                self._draft_grammars(drafts[-1].tolist(), errors)
            masks.append(self._masks(errors))
        if not drafts:
            return steps, torch.empty((len(self.rows), 0), dtype=torch.long, device=self.device), masks
        return steps, torch.stack(drafts, dim=1), masks

    def _draft_grammars(self, tokens: list[int], errors: dict[int, Exception]) -> None:
        for b, row in enumerate(self.rows):
            if row.constraint is not None and b not in errors:
                error = row.constraint.draft(tokens[b])
                if error is not None:
                    errors[b] = error

    def _settle_grammars(self, accepted: list[int], tokens: list[int], errors: dict[int, Exception]) -> None:
        """Roll each constrained row's grammar back over its rejected drafts, on to its last token."""
        for b, row in enumerate(self.rows):
            if row.constraint is not None and b not in errors:
                error = row.constraint.settle(accepted[b], tokens[b])
                if error is not None:
                    errors[b] = error

    def _score(
        self, drafts: torch.Tensor, g: int, masks: list[torch.Tensor | None]
    ) -> tuple[Dists, Dists | None]:
        """p's (and q's) distributions at the ``g + 1`` positions, from one forward each: ``[B * (g+1)]``."""
        sampling = self.sampling.repeat(g + 1)
        allowed = torch.stack(masks, dim=1).flatten(0, 1) if masks else None  # type: ignore[arg-type]
        out: dict[str, Dists] = {}
        for role in (BASE, SMALL_BASE):
            if role in self.runners:
                runner = self.runners[role]
                runner.push_block(drafts)
                logits = runner.last_logits(g + 1)
                out[role] = self._dists(role, logits.flatten(0, 1), sampling, allowed)
        return out[BASE], out.get(SMALL_BASE)

    def _check(
        self,
        drafts: torch.Tensor,
        p_all: Dists,
        q_star: Dists | None,
        q_all: Dists | None,
        u: torch.Tensor,
        limit: torch.Tensor,
        errors: dict[int, Exception],
        checks: list[tuple[Group, Checked]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accepted drafts per row (``[B]``) and the drafts' source codes (``[B, G]``)."""
        b, g = drafts.shape
        codes = torch.full_like(drafts, CODE[Source.ALIGNED])
        if q_star is None:
            return torch.zeros(b, dtype=torch.long, device=self.device), codes
        head = (
            torch.arange(b, device=self.device).unsqueeze(-1) * (g + 1) + torch.arange(g, device=self.device)
        ).flatten()
        p, q = p_all.select(head), q_all.select(head) if q_all is not None else None
        flat = drafts.flatten()
        target_at = torch.zeros(b * g, dtype=torch.float32, device=self.device)
        choices = torch.zeros_like(flat)
        greedy = self.sampling.greedy
        for group in self.groups:
            try:
                target, checked = hybrid_target(
                    group.criterion, group.take(p, g), group.take(q_star, g), group.take(q, g)
                )
            except CriterionError as exc:
                errors.update(dict.fromkeys(group.rows, exc))
                continue
            checks.append((group, checked))
            sub = flat if group.index is None else flat.index_select(0, group.positions(g))
            target_at = group.put(target_at, target.at(sub), g)
            if greedy is not None:
                tokens, token_codes = greedy_from(target)
                choices = group.put(choices, tokens, g)
                codes = group.put(codes.flatten(), token_codes, g).view(b, g)
        if self.literal:  # SSS's rule: accept with min(1, p(x) / q(x))
            assert q is not None
            accept_num, accept_den = mixture.probs_at(p.probs, flat), mixture.probs_at(q.probs, flat)
        else:
            accept_num, accept_den = target_at, mixture.probs_at(q_star.probs, flat)
        n = verify_drafts(accept_num.view(b, g), accept_den.view(b, g), u, limit)
        if greedy is not None:
            n = torch.where(greedy, verify_greedy(drafts, choices.view(b, g), limit), n)
            codes = torch.where(greedy.unsqueeze(-1), codes, CODE[Source.ALIGNED])
        return n, codes

    def _final(
        self,
        p: Dists,
        q_star: Dists,
        q: Dists | None,
        residual: torch.Tensor,
        u: torch.Tensor,
        errors: dict[int, Exception],
        checks: list[tuple[Group, Checked]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's last token per row: from the residual after a rejection, from pi after a full run
        (the bonus); greedy rows take token-level greedy's choice there."""
        tokens = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
        codes = torch.zeros_like(tokens)
        greedy = self.sampling.greedy
        for group in self.groups:
            gp, gq_star, gq = group.take(p), group.take(q_star), group.take(q)
            try:
                target, checked = hybrid_target(group.criterion, gp, gq_star, gq)  # type: ignore[arg-type]
            except CriterionError as exc:
                errors.update(dict.fromkeys(group.rows, exc))
                continue
            checks.append((group, checked))
            pi = target.full()
            if self.literal:
                assert gq is not None
                left = mixture.sss_literal_residual(gp.probs, gq_star.probs, gq.probs, pi)  # type: ignore[union-attr]
            else:
                left = mixture.speculative_residual(pi, gq_star.probs)  # type: ignore[union-attr]
            take = residual if group.index is None else residual.index_select(0, group.index)
            sub_u = u if group.index is None else u.index_select(0, group.index)
            token = pick(torch.where(take.unsqueeze(-1), left, pi), sub_u, None)
            code = torch.where(take, CODE[Source.RESIDUAL], CODE[Source.BONUS])
            if greedy is not None:
                sub_greedy = greedy if group.index is None else greedy.index_select(0, group.index)
                choice, choice_code = greedy_from(target)
                token, code = (
                    torch.where(sub_greedy, choice, token),
                    torch.where(sub_greedy, choice_code, code),
                )
            tokens, codes = group.put(tokens, token), group.put(codes, code)
        return tokens, codes

    def _transfer(
        self,
        n: torch.Tensor,
        token: torch.Tensor,
        code: torch.Tensor,
        drafts: torch.Tensor,
        draft_codes: torch.Tensor,
        checks: list[tuple[Group, Checked]],
    ) -> list[int]:
        """The round's device-to-host transfer: counts, last tokens, drafts, then invalid-output flags."""
        flags = [c.invalid.view(1).long() for _, c in checks]
        packed = torch.cat(
            [torch.stack([n, token, code]).flatten(), drafts.flatten(), draft_codes.flatten(), *flags]
        ).tolist()
        return packed

    def _roll_back(
        self, n: torch.Tensor, accepted: list[int], tokens: list[int], g: int, q_star_stepped: bool
    ) -> None:
        """Drop every model's rejected drafts from its cache, then queue the round's last token.

        p and q were fed all ``g`` drafts; q* the first ``g - 1``, or all ``g`` if it stepped to the
        bonus position.
        """
        kept_max = max(accepted)
        token = torch.tensor(tokens, device=self.device)
        for role, runner in self.runners.items():
            fed = g - 1 if role == ALIGNED and g and not q_star_stepped else g
            runner.rewind(n, fed, kept_max)
            runner.push(token)

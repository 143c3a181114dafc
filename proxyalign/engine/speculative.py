"""Speculative hybrid decoding: q* drafts, p checks them all in one forward, the output is exactly pi.

One round (design §1, "Exact speculative hybrid"), for every row of the batch at once:

1. q* drafts ``gamma`` tokens ``x_i ~ q*_i`` (tempered and filtered exactly as at token level);
2. p (and q, when the target reads it) scores the ``gamma + 1`` positions in one forward pass;
3. ``pi_i`` is computed per position by the same code path as token-level decoding
   (:mod:`proxyalign.engine.targets`); draft ``x_i`` is accepted with ``min(1, pi_i(x_i) / q*_i(x_i))``;
   at the first rejection a token is drawn from ``norm(max(0, pi_i - q*_i))`` and the round ends; if
   every draft passed, a bonus token is drawn from ``pi_{gamma+1}`` (q* steps once more for it, in
   the rounds where some row needs it).

Each emitted token is distributed exactly as at token level, whatever q* is. Rows accept different
numbers of drafts; caches stay rectangular because :meth:`ModelRunner.rewind` crops every row to the
longest accepted run and masks the rejected drafts of shorter rows out as holes (positions come from the
mask's cumulative sum). Nothing is fed twice. There is one host transfer per round (the loop needs the
tokens, and the crop length is a shape), and a second one of ``B`` tokens in rounds with a bonus.

Variants: ``rule="sss_literal"`` is the SSS paper's literal rule (approximate, see
:func:`proxyalign.mixture.sss_literal_acceptance`); temperature 0 runs greedy speculation, which
reproduces token-level greedy decoding token for token (and source for source).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from proxyalign import mixture
from proxyalign.criteria.base import Criterion
from proxyalign.engine.results import Source
from proxyalign.engine.runner import ModelRunner, retain_rows
from proxyalign.engine.sampling import SamplingConfig
from proxyalign.engine.targets import (
    ALIGNED,
    BASE,
    CODES,
    SMALL_BASE,
    Checked,
    Dists,
    greedy_choice,
    hybrid_target,
    model_dists,
    raise_invalid,
)
from proxyalign.engine.token_level import StepResult
from proxyalign.errors import InvalidParameterError

__all__ = ["GammaSchedule", "SpeculativeCounters", "SpeculativeDecoder", "SpeculativeRule"]

SpeculativeRule = Literal["exact", "sss_literal"]
RULES: tuple[str, ...] = ("exact", "sss_literal")
#: ``gamma`` accepted by :meth:`GammaSchedule.parse`: an int in this range, or ``"adaptive"``.
GAMMA_LIMITS = (1, 64)


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Tokens a row gains per round when each draft passes with probability ``acceptance``."""
    if acceptance >= 1:
        return gamma + 1.0
    return (1 - acceptance ** (gamma + 1)) / (1 - acceptance)


@dataclass
class GammaSchedule:
    """How many tokens q* drafts per round: fixed, or adapted to the observed acceptance.

    Adaptive: keep a moving average of the per-draft acceptance rate and pick the gamma that
    maximises expected tokens per round over the round's cost, ``1 + cost_ratio * (gamma + 1)`` in
    units of one p forward (``cost_ratio``: q*'s size over p's). Full acceptances raise the estimate
    and so gamma, early rejections lower both. Among gammas within 2% of the best, the smallest wins:
    past the optimum, extra drafts cost more than they return once p's forward stops being free
    (larger batches).
    """

    value: int = 4
    adaptive: bool = False
    low: int = 1
    high: int = 12
    cost_ratio: float = 0.35
    acceptance: float = 0.8  #: the moving average (a prior until rounds come in)
    smoothing: float = 0.25

    @classmethod
    def parse(cls, gamma: int | str) -> GammaSchedule:
        """``4`` -> fixed gamma 4; ``"adaptive"`` -> chosen per round in ``[1, 12]``."""
        if gamma == "adaptive":
            schedule = cls(adaptive=True)
            schedule.value = schedule.best(schedule.acceptance)
            return schedule
        low, high = GAMMA_LIMITS
        if isinstance(gamma, bool) or not isinstance(gamma, int) or not low <= gamma <= high:
            raise InvalidParameterError(
                f"gamma must be an integer in [{low}, {high}] or 'adaptive', got {gamma!r}"
            )
        return cls(value=gamma)

    def update(self, accepted: Sequence[int], drafted: int) -> None:
        """Adapt after a round that drafted ``drafted`` tokens per row and accepted ``accepted[b]``."""
        if not self.adaptive or drafted == 0 or not accepted:
            return
        checked = sum(n + (n < drafted) for n in accepted)
        self.acceptance += self.smoothing * (sum(accepted) / checked - self.acceptance)
        self.value = self.best(self.acceptance)

    def best(self, acceptance: float) -> int:
        """The smallest gamma within 2% of the highest expected tokens per unit of cost."""
        speed = {
            g: expected_tokens(acceptance, g) / (1 + self.cost_ratio * (g + 1))
            for g in range(self.low, self.high + 1)
        }
        top = max(speed.values())
        return min(g for g, v in speed.items() if v >= 0.98 * top)


@dataclass
class SpeculativeCounters:
    """Whole-batch counts since the call began (per-row ones reach :class:`GenerationStats`)."""

    rounds: int = 0
    drafted: int = 0  #: tokens q* drafted, over all rows (including those discarded unchecked)
    checked: int = 0  #: drafts p checked: accepted ones plus the rejected one ending a round
    accepted: int = 0
    emitted: int = 0  #: accepted drafts plus residual and bonus tokens

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.checked if self.checked else None


class _Round(NamedTuple):
    """Device tensors of a round's checks, transferred to the host together."""

    accepted: torch.Tensor  #: [B] number of leading drafts accepted
    token: torch.Tensor  #: [B] the residual (or greedy correction) token; meaningless where all passed
    token_code: torch.Tensor  #: [B] its source code
    draft_codes: torch.Tensor  #: [B, G] source codes of the drafts, should they be accepted
    checked: Checked


class _HostRound(NamedTuple):
    accepted: list[int]
    token: list[int]
    token_code: list[int]
    drafts: list[list[int]]
    draft_codes: list[list[int]]
    invalid: bool


def _stack_positions(steps: Sequence[Dists]) -> Dists:
    """Per-position ``[B, V]`` distributions -> rows ``[B * len(steps), V]``, row-major by batch row."""
    sample = torch.stack([d.sample for d in steps], dim=1).flatten(0, 1)
    if all(d.view is d.sample for d in steps):
        return Dists(sample, sample)
    return Dists(sample, torch.stack([d.view for d in steps], dim=1).flatten(0, 1))


def _size(model: torch.nn.Module) -> int:
    """Parameter count: a proxy for a forward pass's cost at small batch (weights are read once)."""
    return sum(p.numel() for p in model.parameters())


class SpeculativeDecoder:
    """Advances every row by one speculative round: 1 to ``gamma + 1`` tokens per row per step."""

    def __init__(
        self,
        runners: Mapping[str, ModelRunner],
        criterion: Criterion,
        sampling: SamplingConfig,
        vocab_size: int,
        generator: torch.Generator | None,
        *,
        gamma: GammaSchedule | None = None,
        max_new_tokens: int | None = None,
        rule: SpeculativeRule = "exact",
    ) -> None:
        if criterion.always_rejects:
            raise InvalidParameterError(
                f"criterion {criterion.name!r} samples q* alone: decode it at token level, nothing to check"
            )
        if rule not in RULES:
            raise InvalidParameterError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
        if rule == "sss_literal" and SMALL_BASE not in runners:
            raise InvalidParameterError("the literal SSS rule needs the small base model q (small_base=...)")
        self.runners = runners
        self.criterion = criterion
        self.sampling = sampling
        self.vocab_size = vocab_size
        self.generator = generator
        self.gamma = gamma or GammaSchedule()
        if self.gamma.adaptive:
            self.gamma.cost_ratio = _size(runners[ALIGNED].model) / _size(runners[BASE].model)
            self.gamma.value = self.gamma.best(self.gamma.acceptance)
        self.max_new_tokens = max_new_tokens
        self.rule = rule
        self.device = runners[BASE].device
        self.batch_size = runners[BASE].pending.shape[0]
        self.produced = [0] * self.batch_size
        self.counters = SpeculativeCounters()

    # -- one round -----------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Draft, score, check and roll back; every row gets its accepted drafts plus one more token.

        The bonus position needs q* one step further (``q*_{g+1}``): that forward runs only when some
        row accepted every draft, which the round's host transfer says anyway.
        """
        g = self._round_gamma()
        q_star, drafts = self._draft(g)
        scored = {role: self._score(role, drafts) for role in (BASE, SMALL_BASE) if role in self.runners}
        head = {role: self._positions(role, logits, slice(0, g)) for role, logits in scored.items()}
        outcome = self._check(head[BASE], q_star, head.get(SMALL_BASE), drafts)
        host = self._to_host(outcome, drafts)
        if host.invalid:
            raise_invalid(self.criterion, outcome.checked)
        tokens, codes = host.token, host.token_code
        complete = [n == g for n in host.accepted]
        if any(complete):
            last = {role: self._positions(role, logits, slice(g, g + 1)) for role, logits in scored.items()}
            tokens, codes = self._bonus(last[BASE], last.get(SMALL_BASE), drafts, complete, tokens, codes)
        token = torch.tensor(tokens, device=self.device)
        self._roll_back(host.accepted, token, g, any(complete))
        self._account(host.accepted, g)
        rows = zip(host.drafts, host.draft_codes, host.accepted, tokens, codes, strict=True)
        steps = [([*d[:n], t], [*c[:n], code]) for d, c, n, t, code in rows]
        return StepResult(
            tokens=[t for t, _ in steps],
            sources=[c for _, c in steps],
            drafted=[n + (n < g) for n in host.accepted],
            rejected=[int(n < g) for n in host.accepted],
            pgm_checked=[0] * self.batch_size,
            pgm_holds=[0] * self.batch_size,
        )

    def _round_gamma(self) -> int:
        """The schedule's gamma, cut so that no row is drafted past what the slowest row still needs."""
        g = self.gamma.value
        if self.max_new_tokens is not None:
            g = min(g, max(0, self.max_new_tokens - min(self.produced) - 1))
        return g

    # -- models ----------------------------------------------------------------------------------
    def _dists(self, role: str, logits: torch.Tensor) -> Dists:
        return model_dists(logits.to(self.device, non_blocking=True), self.vocab_size, self.sampling, role)

    def _draft(self, g: int) -> tuple[Dists, torch.Tensor]:
        """q*'s drafts ``[B, g]`` and the distributions they came from (``[B * g, V]``).

        q* is fed the first ``g - 1`` drafts; the last one is fed only if the bonus position needs it.
        """
        runner = self.runners[ALIGNED]
        steps: list[Dists] = []
        drafts: list[torch.Tensor] = []
        for i in range(g):
            if i:
                runner.push(drafts[-1])
            steps.append(self._dists(ALIGNED, runner.next_logits()))
            drafts.append(self._pick(steps[-1].sample))
        if not drafts:
            empty = torch.empty((0, self.vocab_size), device=self.device)
            return Dists(empty, empty), torch.empty(
                (self.batch_size, 0), dtype=torch.long, device=self.device
            )
        return _stack_positions(steps), torch.stack(drafts, dim=1)

    def _pick(self, probs: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return probs.argmax(dim=-1)
        return mixture.sample_inverse_cdf(probs, self.generator)

    def _score(self, role: str, drafts: torch.Tensor) -> torch.Tensor:
        """Logits of one forward of p (or q) over its queued token and the drafts: ``[B, g + 1, V_model]``."""
        runner = self.runners[role]
        runner.push_block(drafts)
        return runner.last_logits(drafts.shape[1] + 1)

    def _positions(self, role: str, logits: torch.Tensor, positions: slice) -> Dists:
        """Distributions at some of the scored positions, as rows ``[B * len, V]``."""
        return self._dists(role, logits[:, positions].flatten(0, 1))

    # -- checks ----------------------------------------------------------------------------------
    def _check(self, p: Dists, q_star: Dists, q: Dists | None, drafts: torch.Tensor) -> _Round:
        g = drafts.shape[1]
        if g == 0:
            zeros = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
            return _Round(zeros, zeros, zeros, drafts, Checked(zeros[:0].any(), drafts, "mu"))
        if self.sampling.greedy:
            return self._check_greedy(p, q_star, q, drafts)
        return self._check_sampled(p, q_star, q, drafts)

    def _check_sampled(self, p: Dists, q_star: Dists, q: Dists | None, drafts: torch.Tensor) -> _Round:
        """Accept drafts with ``min(1, pi/q*)`` and draw the residual where the first one failed."""
        g = drafts.shape[1]
        target, checked = hybrid_target(self.criterion, p, q_star, q)
        flat = drafts.flatten()
        q_at = mixture.probs_at(q_star.sample, flat)
        if self.rule == "sss_literal" and q is not None:
            accept = mixture.sss_literal_acceptance(
                mixture.probs_at(p.sample, flat), mixture.probs_at(q.sample, flat)
            )
        else:
            accept = mixture.acceptance_probability(target.at(flat), q_at)
        n = mixture.accepted_lengths(accept.view(self.batch_size, g), self.generator)
        # the row of the first failed draft (meaningless, but in range, where every draft passed)
        at = torch.arange(self.batch_size, device=self.device) * g + n.clamp(max=g - 1)
        pi, qs = self._guard(target.rows(at), checked, q_star.sample[at]), q_star.sample[at]
        if self.rule == "sss_literal" and q is not None:
            residual = mixture.sss_literal_residual(p.sample[at], qs, q.sample[at], pi)
        else:
            residual = mixture.speculative_residual(pi, qs)
        token = mixture.sample_inverse_cdf(residual, self.generator)
        code = torch.full_like(token, CODES[Source.RESIDUAL])
        return _Round(n, token, code, torch.full_like(drafts, CODES[Source.ALIGNED]), checked)

    def _check_greedy(self, p: Dists, q_star: Dists, q: Dists | None, drafts: torch.Tensor) -> _Round:
        """Accept the longest run of drafts equal to token-level greedy's choice, then emit its choice."""
        g = drafts.shape[1]
        tokens, codes, checked = greedy_choice(self.criterion, p, q_star, q)
        tokens, codes = tokens.view(self.batch_size, g), codes.view(self.batch_size, g)
        n = (drafts == tokens).long().cumprod(dim=-1).sum(dim=-1)
        rows, at = torch.arange(self.batch_size, device=self.device), n.clamp(max=g - 1)
        return _Round(n, tokens[rows, at], codes[rows, at], codes, checked)

    def _guard(self, probs: torch.Tensor, checked: Checked, fallback: torch.Tensor) -> torch.Tensor:
        """An invalid criterion output is reported after the host transfer; until then sample from
        ``fallback`` instead, so that NaN cannot crash the sampler first."""
        return torch.where(checked.invalid, fallback, probs)

    def _bonus(
        self,
        p: Dists,
        q: Dists | None,
        drafts: torch.Tensor,
        complete: list[bool],
        tokens: list[int],
        codes: list[int],
    ) -> tuple[list[int], list[int]]:
        """Rows that accepted every draft get a token from pi at the next position (q* steps once more)."""
        runner = self.runners[ALIGNED]
        if drafts.shape[1]:
            runner.push(drafts[:, -1])
        q_star = self._dists(ALIGNED, runner.next_logits())
        if self.sampling.greedy:
            bonus, bonus_codes, checked = greedy_choice(self.criterion, p, q_star, q)
        else:
            target, checked = hybrid_target(self.criterion, p, q_star, q)
            all_rows = torch.arange(self.batch_size, device=self.device)
            bonus = mixture.sample_inverse_cdf(
                self._guard(target.rows(all_rows), checked, q_star.sample), self.generator
            )
            bonus_codes = torch.full_like(bonus, CODES[Source.BONUS])
        packed = torch.cat([bonus, bonus_codes, checked.invalid.to(bonus.device).long().view(1)]).tolist()
        if packed[-1]:
            raise_invalid(self.criterion, checked)
        b = self.batch_size
        tokens = [x if full else t for x, t, full in zip(packed[:b], tokens, complete, strict=True)]
        codes = [x if full else c for x, c, full in zip(packed[b : 2 * b], codes, complete, strict=True)]
        return tokens, codes

    # -- bookkeeping -----------------------------------------------------------------------------
    def _to_host(self, outcome: _Round, drafts: torch.Tensor) -> _HostRound:
        """The round's device-to-host transfer."""
        b, g = drafts.shape
        packed = torch.cat(
            [
                torch.stack([outcome.accepted, outcome.token, outcome.token_code]).flatten(),
                drafts.flatten(),
                outcome.draft_codes.flatten(),
                outcome.checked.invalid.to(drafts.device).long().view(1),
            ]
        ).tolist()
        accepted, token, code = packed[:b], packed[b : 2 * b], packed[2 * b : 3 * b]
        draft_flat, code_flat = packed[3 * b : 3 * b + b * g], packed[3 * b + b * g : 3 * b + 2 * b * g]
        draft_rows = [draft_flat[i * g : (i + 1) * g] for i in range(b)]
        code_rows = [code_flat[i * g : (i + 1) * g] for i in range(b)]
        return _HostRound(accepted, token, code, draft_rows, code_rows, bool(packed[-1]))

    def _roll_back(self, accepted: list[int], token: torch.Tensor, g: int, q_star_stepped: bool) -> None:
        """Drop every model's rejected drafts from its cache, then queue the round's last token.

        p and q were fed all ``g`` drafts; q* the first ``g - 1``, or all ``g`` if it stepped to the
        bonus position.
        """
        kept = torch.tensor(accepted, device=self.device)
        kept_max = max(accepted)
        for role, runner in self.runners.items():
            fed = g - 1 if role == ALIGNED and g and not q_star_stepped else g
            runner.rewind(kept, fed, kept_max)
            runner.push(token)

    def _account(self, accepted: list[int], g: int) -> None:
        """Batch counters, per-row progress and the gamma schedule."""
        c = self.counters
        c.rounds += 1
        c.drafted += g * len(accepted)
        c.accepted += sum(accepted)
        c.checked += sum(n + (n < g) for n in accepted)
        c.emitted += sum(accepted) + len(accepted)
        self.produced = [made + n + 1 for made, n in zip(self.produced, accepted, strict=True)]
        self.gamma.update(accepted, g)

    def retain(self, rows: Sequence[int]) -> None:
        """Drop finished rows from every model's batch (see :meth:`ModelRunner.retain`).

        Rows leave as soon as they finish, so every row left still needs tokens and none grows past
        ``max_new_tokens + gamma + 1`` positions.
        """
        self.batch_size = retain_rows(self.runners, rows)
        self.produced = [self.produced[row] for row in rows]

    def forward_counts(self) -> tuple[int, int]:
        """(forward passes of p, forward passes of q*) since the call began."""
        return self.runners[BASE].forwards, self.runners[ALIGNED].forwards

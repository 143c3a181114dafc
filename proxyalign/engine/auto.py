"""``mode="auto"``: before every step, choose token level or a speculative round of ``gamma`` drafts.

Whichever is chosen samples the hybrid distribution exactly (a token step draws the next token from
pi; a speculative round of any gamma yields tokens distributed as pi, given their prefix), and the
choice depends only on what happened before the step, never on the step's own random numbers, so the
sequence is distributed exactly as in either fixed mode. What the choice changes is speed: it picks
the option with the highest expected tokens per second from

- the costs of the forwards each option runs, measured on this host for this pair at this batch size
  (:class:`~proxyalign.engine.costs.ForwardCosts`): a token step is one p forward (plus q*'s when a
  row needs it), a round of gamma drafts is gamma q* steps and one p forward over gamma + 1 positions;
- each row's acceptance rate of q*'s drafts, tracked as it decodes (drafts passed over drafts checked,
  older drafts weighing less, starting from a prior): a round of gamma drafts yields
  ``sum(E[a^i] for i in 0..gamma)`` tokens per row on average, the expectation taken over what the
  evidence says ``a`` may be (:meth:`CostPolicy.passing_runs`);
- a correction learnt from the steps' measured durations (criterion, sampling, host transfers: what the
  forwards alone leave out).

During token steps nothing tells how q*'s drafts would fare, so each row's estimate drifts back to the
prior: speculation is retried now and then, and a row whose drafts start passing again is noticed.

Both kinds of step keep the lane's invariant (every model has seen all tokens but the last, which is
queued), so the lane switches between them at any step with nothing to convert.

The seeded random stream of a row is consumed differently by the two kinds, and the choice depends on
measured timings: in this mode a seeded request samples the same distribution but not reproducibly the
same tokens. Use a fixed mode for reproducible seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxyalign.criteria.base import CriterionKind
from proxyalign.engine.costs import ForwardCosts
from proxyalign.engine.gamma import AUTO_GAMMAS, GammaSchedule
from proxyalign.engine.lanes import LaneRow, RowStep, TokenLane
from proxyalign.engine.request import LaneKey
from proxyalign.engine.speculative import SpeculativeLane
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE

__all__ = ["AUTO_GAMMAS", "AutoLane", "AutoPolicy", "Choice", "CostPolicy"]


@dataclass(frozen=True)
class Choice:
    """How a lane decodes one step: ``gamma`` drafts per row (0: token level), and why."""

    gamma: int
    reason: str = ""
    rates: dict[str, float] = field(default_factory=dict, compare=False)  #: expected tokens/s per option

    @property
    def label(self) -> str:
        return "token" if self.gamma == 0 else f"gamma {self.gamma}"


class AutoPolicy(Protocol):
    """Chooses each step of an :class:`AutoLane` and learns from it."""

    def choose(self, lane: AutoLane) -> Choice: ...

    def observe(self, lane: AutoLane, choice: Choice, steps: Sequence[RowStep], seconds: float) -> None: ...


@dataclass
class _Row:
    """What the policy keeps per row: its prior, and its drafts checked and passed, older ones discounted.

    Counting drafts, not rounds, weighs a round by what it revealed: a 1-draft round that fails says
    less than a 6-draft one, and an estimate moved a fixed step per round got stuck on short rounds
    after one unlucky draft (measured on the offline pair)."""

    prior: float
    passed: float = 0.0
    checked: float = 0.0


class CostPolicy:
    """Expected tokens per second of each option, from measured forward costs and tracked acceptance.

    - ``prior``: acceptance assumed before any draft was checked, worth ``prior_weight`` drafts of
      evidence; a row joining later starts from the acceptance of every row's drafts so far (older
      ones discounted by ``pool_memory`` per draft), i.e. from what this pair has shown, so a new
      request does not spend its first rounds climbing from a guess;
    - ``memory``: each draft checked discounts the row's earlier evidence by this factor (about
      ``1 / (1 - memory)`` recent drafts count), and each token step by ``1 - drift``, so the estimate
      drifts back to the prior while nothing is drafted;
    - ``margin``: speculation must beat token level by this fraction, so measurement noise cannot
      make auto slower than the token-level hybrid.
    """

    def __init__(
        self,
        costs: ForwardCosts,
        *,
        gammas: Sequence[int] = AUTO_GAMMAS,
        prior: float = 0.8,
        prior_weight: float = 4.0,
        memory: float = 0.97,
        drift: float = 0.02,
        margin: float = 0.03,
        pool_memory: float = 0.995,
    ) -> None:
        self.costs = costs
        self.gammas = tuple(sorted(gammas))
        self.prior = prior
        self.prior_weight = prior_weight
        self.memory = memory
        self.drift = drift
        self.margin = margin
        self.pool_memory = pool_memory
        #: every row's drafts, for the prior of rows to come
        self.pooled = _Row(prior)
        #: measured / predicted seconds of the lane's steps, per kind of step (moving average)
        self.correction: dict[str, float] = {}
        #: fraction of token steps in which q* ran (lazy criteria run it only after a rejection)
        self.q_star_share = 0.5

    # -- choosing ----------------------------------------------------------------------------------
    def choose(self, lane: AutoLane) -> Choice:
        rows = len(lane.rows)
        remaining = [row.request.max_new_tokens - row.produced for row in lane.rows]
        runs = [self.passing_runs(row, max(self.gammas)) for row in lane.rows]  # runs[1]: acceptance
        token_s = self._token_seconds(lane, rows)
        rates = {"token": rows / token_s}
        for gamma in self._viable(lane, rows, token_s):
            cut = [max(0, min(gamma, left - 1)) for left in remaining]
            gained = sum(sum(run[: g + 1]) for run, g in zip(runs, cut, strict=True))
            rates[f"gamma {gamma}"] = gained / self._round_seconds(lane, rows, gamma, runs)
        best = max(rates, key=rates.__getitem__)
        mean_acceptance = sum(run[1] for run in runs) / rows
        if best == "token" or rates[best] < rates["token"] * (1 + self.margin):
            return Choice(
                0,
                f"token level: {rates['token']:.2f} tok/s expected"
                + (f", best speculative {best} {rates[best]:.2f}" if best != "token" else "")
                + f" (acceptance {mean_acceptance:.2f}, batch {rows})",
                rates,
            )
        return Choice(
            int(best.split()[1]),
            f"{best}: {rates[best]:.2f} tok/s expected vs token level {rates['token']:.2f} "
            f"(acceptance {mean_acceptance:.2f}, batch {rows})",
            rates,
        )

    def _viable(self, lane: AutoLane, rows: int, token_s: float) -> list[int]:
        """Gammas worth weighing: measured in order, stopping at the first that could not beat token
        level even if every draft passed (on hosts where verifying positions is not nearly free this
        stops at once, so little is measured)."""
        viable = []
        q_star = self.costs.seconds(ALIGNED, rows)
        for gamma in self.gammas:
            if lane.window_room() < gamma:
                break
            best_case = self._forwards(lane, rows, gamma + 1) + gamma * q_star
            if (gamma + 1) / best_case <= 1 / token_s:
                break
            viable.append(gamma)
        return viable

    def _forwards(self, lane: AutoLane, rows: int, positions: int) -> float:
        """p's (and q's) forward over ``positions`` per row, corrected by the speculative steps' record."""
        seconds = self.costs.seconds(BASE, rows, positions)
        if SMALL_BASE in lane.roles:
            seconds += self.costs.seconds(SMALL_BASE, rows, positions)
        return seconds * self._correction("speculative")

    def _token_seconds(self, lane: AutoLane, rows: int) -> float:
        share = self.q_star_share if lane.lazy_only else 1.0
        seconds = self.costs.seconds(BASE, rows) + share * self.costs.seconds(ALIGNED, rows)
        if SMALL_BASE in lane.roles:
            seconds += share * self.costs.seconds(SMALL_BASE, rows)
        return seconds * self._correction("token")

    def _round_seconds(self, lane: AutoLane, rows: int, gamma: int, runs: Sequence[Sequence[float]]) -> float:
        # q* steps once more when some row passes all its drafts (the bonus position)
        none_pass_all = math.prod(1 - run[gamma] for run in runs)
        q_star = (gamma + 1 - none_pass_all) * self.costs.seconds(ALIGNED, rows)
        return self._forwards(lane, rows, gamma + 1) + q_star * self._correction("speculative")

    def _correction(self, kind: str) -> float:
        """A kind never run yet borrows the other's correction (both pay the same kind of overheads)."""
        return self.correction.get(kind) or next(iter(self.correction.values()), 1.0)

    # -- learning ------------------------------------------------------------------------------------
    def observe(self, lane: AutoLane, choice: Choice, steps: Sequence[RowStep], seconds: float) -> None:
        kind = "token" if choice.gamma == 0 else "speculative"
        rows = len(lane.rows)
        if choice.gamma == 0 and lane.lazy_only:
            self.q_star_share += 0.1 * (float(lane.q_star_ran) - self.q_star_share)
        if choice.gamma == 0:
            predicted = self._token_seconds(lane, rows) / self._correction("token")
        else:
            runs = [self.passing_runs(row, choice.gamma) for row in lane.rows]
            predicted = self._round_seconds(lane, rows, choice.gamma, runs) / self._correction("speculative")
        ratio = seconds / predicted if predicted > 0 else 1.0
        old = self.correction.get(kind)
        self.correction[kind] = ratio if old is None else old + 0.3 * (ratio - old)
        for row, step in zip(lane.rows, steps, strict=True):
            self.record(row, step.drafted - step.rejected, step.drafted, token_step=choice.gamma == 0)

    def record(self, row: LaneRow, passed: int, checked: int, *, token_step: bool = False) -> None:
        """Add a step's evidence to a row's estimate: ``checked`` drafts of which ``passed`` passed."""
        state = self._row(row)
        keep = (1 - self.drift) if token_step else self.memory**checked
        state.passed = state.passed * keep + passed
        state.checked = state.checked * keep + checked
        if checked:
            keep = self.pool_memory**checked
            self.pooled.passed = self.pooled.passed * keep + passed
            self.pooled.checked = self.pooled.checked * keep + checked

    def acceptance(self, row: LaneRow) -> float:
        """The row's estimated probability that a draft passes."""
        return self._estimate(self._row(row))

    def passing_runs(self, row: LaneRow, longest: int) -> list[float]:
        """``E[a^i]`` for ``i = 0..longest``: the chance that the row's next ``i`` drafts all pass.

        Averaged over what ``a`` may be given the evidence (a Beta posterior: the prior's and the
        passed drafts against the failed), not ``mean^i``: with little evidence, early in a request or
        after one failed draft, long runs of passes are likelier than ``mean^i`` says (prior 0.8 worth
        4 drafts: 0.42 for 6 passes, not 0.26), and the plug-in value steered auto to short rounds.
        """
        passed, checked = self._evidence(self._row(row))
        runs = [1.0]
        for i in range(longest):
            runs.append(runs[-1] * (passed + i) / (checked + i))
        return runs

    def _evidence(self, state: _Row) -> tuple[float, float]:
        """Drafts passed and checked, the prior's ``prior_weight`` drafts included."""
        return state.prior * self.prior_weight + state.passed, self.prior_weight + state.checked

    def _estimate(self, state: _Row) -> float:
        passed, checked = self._evidence(state)
        return passed / checked

    def _row(self, row: LaneRow) -> _Row:
        if not isinstance(row.policy_state, _Row):
            row.policy_state = _Row(self._estimate(self.pooled))
        return row.policy_state


class AutoLane(SpeculativeLane, TokenLane):
    """A lane that runs a token step or a speculative round, whichever its policy expects faster."""

    def __init__(
        self,
        key: LaneKey,
        models: dict[str, Any],
        vocab_size: int,
        pad_id: int,
        window: int | None,
        policy: AutoPolicy,
    ) -> None:
        super().__init__(key, models, vocab_size, pad_id, window)
        self.policy = policy
        self.choice: Choice | None = None
        self.q_star_ran = False  #: whether the last token step needed q*

    def join(self, rows: Sequence[LaneRow], runners: dict) -> None:
        for row in rows:
            row.schedule = GammaSchedule(value=0)  # the lane's choice, set per step in _gammas
        TokenLane.join(self, rows, runners)

    @property
    def lazy_only(self) -> bool:
        """Whether token steps run q* only after a rejection (every row's criterion reads only p)."""
        return all(group.criterion.kind is CriterionKind.LAZY for group in self.groups)

    def window_room(self) -> float:
        """Tokens every row can still add before the context window (inf: no window)."""
        if self.window is None:
            return math.inf
        return min(self.window - row.length for row in self.rows) - 1

    def _gammas(self) -> list[int]:
        assert self.choice is not None
        for row in self.rows:
            assert row.schedule is not None
            row.schedule.value = self.choice.gamma
        return super()._gammas()

    def step(self) -> list[RowStep]:
        self.choice = choice = self.policy.choose(self)
        q_star_before = self.runners[ALIGNED].forwards
        started = time.perf_counter()
        steps = TokenLane.step(self) if choice.gamma == 0 else SpeculativeLane.step(self)
        seconds = time.perf_counter() - started  # the step ended with its host transfer: real time
        self.q_star_ran = self.runners[ALIGNED].forwards > q_star_before
        self.policy.observe(self, choice, steps, seconds)
        for step in steps:
            step.choice = choice
        return steps

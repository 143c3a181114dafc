"""How many tokens q* drafts per speculative round: a fixed number, or one adapted to the acceptance.

Each request keeps its own schedule, so the drafts a row gets (and so the random numbers it uses)
depend on its own history only, never on the rows beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxyalign.errors import InvalidParameterError

__all__ = ["AUTO_GAMMAS", "GAMMA_LIMITS", "GammaSchedule", "expected_tokens"]

#: ``gamma`` accepted by :meth:`GammaSchedule.parse`: an int in this range, or ``"adaptive"``.
GAMMA_LIMITS = (1, 64)
#: The gammas ``mode="auto"`` weighs against token level.
AUTO_GAMMAS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)


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

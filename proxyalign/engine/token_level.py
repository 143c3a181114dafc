"""One decoding step of the token-level hybrid: distributions -> criterion -> sampled tokens.

Three paths, one output distribution each:

- *lazy* (criteria that read only p): draft from p, and run q* only when some row's draft is rejected;
- *eager* (criteria that read q* or q): every model every step, two-stage sampling;
- *target* (criteria defined by a target, e.g. ``implicit_reward``): exact draws from the target, in two
  stages where the target is a rejection PGM (so provenance is known), directly elsewhere.

Per step there is one host transfer of the sampled tokens (the loop needs them for EOS and stop
strings anyway), plus one more on lazy steps where a draft was rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
    model_dists,
    raise_invalid,
    rejection,
    target,
)

__all__ = ["StepResult", "TokenLevelDecoder"]


@dataclass
class StepResult:
    """Tokens produced for every row in one step (one token per row at token level)."""

    tokens: list[list[int]]
    sources: list[list[int]]
    drafted: list[int]
    rejected: list[int]
    pgm_checked: list[int]
    pgm_holds: list[int]


class _Draw(NamedTuple):
    """Device tensors of one step, transferred to the host together."""

    tokens: torch.Tensor
    codes: torch.Tensor
    drafted: torch.Tensor
    rejected: torch.Tensor
    pgm_checked: torch.Tensor
    pgm_holds: torch.Tensor
    checked: Checked | None = None  #: criterion output to validate (None: already validated)


class TokenLevelDecoder:
    """Samples one token per row per step from the criterion's hybrid distribution."""

    def __init__(
        self,
        runners: Mapping[str, ModelRunner],
        criterion: Criterion,
        sampling: SamplingConfig,
        vocab_size: int,
        generator: torch.Generator | None,
    ) -> None:
        self.runners = runners
        self.criterion = criterion
        self.sampling = sampling
        self.vocab_size = vocab_size
        self.generator = generator
        lead = runners[ALIGNED] if criterion.always_rejects else runners[BASE]
        self.device = lead.device
        self.batch_size = lead.pending.shape[0]

    def _dists(self, role: str) -> Dists:
        logits = self.runners[role].next_logits().to(self.device, non_blocking=True)
        return model_dists(logits, self.vocab_size, self.sampling, role)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Sample the next token of every row, queue it to every model, report it to the host."""
        if self.criterion.always_rejects:
            draw = self._step_aligned_only()
        elif self.criterion.defines_target:
            draw = self._step_target()
        elif self.criterion.lazy_aligned:
            draw = self._step_lazy()
        else:
            draw = self._step_eager()
        for runner in self.runners.values():
            runner.push(draw.tokens)
        rows = torch.stack(
            [draw.tokens, draw.codes, draw.drafted, draw.rejected, draw.pgm_checked, draw.pgm_holds]
        )
        invalid = draw.checked.invalid if draw.checked is not None else torch.zeros((), dtype=torch.bool)
        packed = torch.cat([rows.flatten().long(), invalid.to(rows.device).long().view(1)]).tolist()
        if packed[-1]:
            raise_invalid(self.criterion, draw.checked)
        b = self.batch_size
        tokens, codes, drafted, rejected, checked, holds = (packed[i * b : (i + 1) * b] for i in range(6))
        return StepResult(
            tokens=[[t] for t in tokens],
            sources=[[c] for c in codes],
            drafted=drafted,
            rejected=rejected,
            pgm_checked=checked,
            pgm_holds=holds,
        )

    def _sample(self, probs: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return probs.argmax(dim=-1)
        return mixture.sample(probs, self.generator)

    def _step_aligned_only(self) -> _Draw:
        tokens = self._sample(self._dists(ALIGNED).sample)
        ones, zeros = torch.ones_like(tokens), torch.zeros_like(tokens)
        return _Draw(tokens, ones * CODES[Source.ALIGNED], ones, ones, zeros, zeros)

    def _step_lazy(self) -> _Draw:
        p = self._dists(BASE)
        checked = rejection(self.criterion, p, None, None)
        mu = checked.tensor
        draft, rejected = mixture.draft(p.sample, mu.clamp(0, 1), self.generator, greedy=self.sampling.greedy)
        # The one extra host sync of the lazy path: does any row need q* this step?
        flags = torch.cat([rejected, checked.invalid.view(1)]).tolist()
        if flags[-1]:
            raise_invalid(self.criterion, checked)
        tokens = draft
        if any(flags[:-1]):
            tokens = torch.where(rejected, self._sample(self._dists(ALIGNED).sample), draft)
        ones, zeros = torch.ones_like(tokens), torch.zeros_like(tokens)
        return _Draw(tokens, rejected.long(), ones, rejected.long(), zeros, zeros)

    def _step_eager(self) -> _Draw:
        p = self._dists(BASE)
        q_star = self._dists(ALIGNED)
        q = self._dists(SMALL_BASE) if "q" in self.criterion.reads else None
        checked = rejection(self.criterion, p, q_star, q)
        tokens, rejected = mixture.two_stage_sample(
            p.sample, q_star.sample, checked.tensor.clamp(0, 1), self.generator, greedy=self.sampling.greedy
        )
        ones, zeros = torch.ones_like(tokens), torch.zeros_like(tokens)
        return _Draw(tokens, rejected.long(), ones, rejected.long(), zeros, zeros, checked)

    def _step_target(self) -> _Draw:
        p = self._dists(BASE)
        q_star = self._dists(ALIGNED)
        q = self._dists(SMALL_BASE) if "q" in self.criterion.reads else None
        checked = target(self.criterion, p, q_star, q)
        pi = checked.tensor
        if self.sampling.greedy:
            tokens = pi.argmax(dim=-1)
            zeros = torch.zeros_like(tokens)
            codes = torch.full_like(tokens, CODES[Source.TARGET])
            return _Draw(tokens, codes, zeros, zeros, zeros, zeros, checked)
        decomposition = mixture.pgm_decomposition(p.sample, q_star.sample, pi)
        pgm_tokens, rejected = mixture.two_stage_sample(
            p.sample, q_star.sample, decomposition.mu, self.generator
        )
        holds = decomposition.holds
        tokens = torch.where(holds, pgm_tokens, mixture.sample(pi, self.generator))
        codes = torch.where(holds, rejected.long(), CODES[Source.TARGET])
        return _Draw(
            tokens,
            codes,
            holds.long(),
            (holds & rejected).long(),
            torch.ones_like(tokens),
            holds.long(),
            checked,
        )

    def retain(self, rows: Sequence[int]) -> None:
        """Drop finished rows from every model's batch (see :meth:`ModelRunner.retain`)."""
        self.batch_size = retain_rows(self.runners, rows)

    def forward_counts(self) -> tuple[int, int]:
        """(forward passes of p, forward passes of q*) since the call began."""
        counts = [self.runners[role].forwards if role in self.runners else 0 for role in (BASE, ALIGNED)]
        return counts[0], counts[1]

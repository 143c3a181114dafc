"""Each constrained row's grammar state, and the token masks a lane applies to every model.

A row built with a :class:`~proxyalign.constrained.Grammar` gets its own llguidance matcher when it
joins a lane. Before each forward's distributions are formed, the lane asks every constrained row for
the tokens its grammar allows next (:func:`grammar_masks`); the mask is applied to p, q* and q alike,
before temperature, top-k/top-p and the criterion (design: docs/criteria.md, "Constrained decoding").
Unconstrained rows of the same batch get an all-true mask.

Speculative rounds advance the matcher over q*'s drafts (one mask per draft position, for q* and for
p's verification) and then roll back the drafts p rejected (:meth:`RowConstraint.settle`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from llguidance.torch import fill_next_token_bitmask

from proxyalign.constrained import Grammar, allowed_bits
from proxyalign.constrained.compiler import any_allowed
from proxyalign.errors import ConstraintError

__all__ = ["RowConstraint", "grammar_masks"]


class RowConstraint:
    """One row's position in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = grammar.matcher()
        self.what = grammar.what
        self.words = (grammar.tokenizer.vocab_size + 31) // 32
        self.eos = list(grammar.tokenizer.eos_tokens)
        self.drafted = 0  #: drafts consumed in the current speculative round

    @property
    def complete(self) -> bool:
        """The output is a whole sentence of the grammar that nothing can extend: only EOS may follow
        (llguidance calls this *stopped*; an EOS consumed then is not a step of its history)."""
        return self.matcher.is_stopped()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the row's allowed next tokens into a packed mask."""
        if self.complete:
            bitmask[row] = 0
            for token in self.eos:
                bitmask[row, token // 32] |= _bit(token % 32)
        else:
            fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, tokens: Sequence[int]) -> ConstraintError | None:
        """Consume emitted tokens; an error (a token the grammar refused) fails the row."""
        for token in tokens:
            if self.complete:
                break  # the EOS that ends the row
            if not self.matcher.consume_token(token):
                return self._error(f"token {token} is not allowed here")
        return None

    def draft(self, token: int) -> ConstraintError | None:
        """Consume one of q*'s drafts provisionally (rolled back by :meth:`settle` if rejected)."""
        if self.complete:
            return None  # an EOS after the end: not a step the matcher records
        self.drafted += 1
        return self.advance([token])

    def settle(self, accepted: int, token: int) -> ConstraintError | None:
        """End a speculative round: keep ``accepted`` drafts, roll back the rest, consume the round's
        last token."""
        drafted, self.drafted = self.drafted, 0
        keep = min(accepted, drafted)
        if drafted > keep and not self.matcher.rollback(drafted - keep):
            return self._error(f"could not roll back {drafted - keep} rejected draft(s)")
        if accepted > drafted:  # the accepted drafts reached the grammar's end: the row ends there
            return None
        return self.advance([token])

    def _error(self, problem: str) -> ConstraintError:
        detail = self.matcher.get_error() if self.matcher.is_error() else ""
        return ConstraintError(f"{self.what}: {problem}{f' ({detail})' if detail else ''}")


def grammar_masks(
    constraints: Sequence[RowConstraint | None], vocab_size: int, device: torch.device | None
) -> tuple[torch.Tensor | None, dict[int, ConstraintError]]:
    """``bool [B, vocab_size]`` of the tokens each row may take next (all true for unconstrained rows,
    EOS only for a complete output), or None when no row is constrained; and the rows whose grammar
    allows nothing (they fail; their mask is left all true so the step stays well defined)."""
    live = [(b, c) for b, c in enumerate(constraints) if c is not None]
    if not live:
        return None, {}
    bitmask = torch.full((len(constraints), live[0][1].words), -1, dtype=torch.int32)
    errors: dict[int, ConstraintError] = {}
    for b, constraint in live:
        constraint.fill(bitmask, b)
        if constraint.matcher.is_error() or not any_allowed(bitmask[b], vocab_size):
            errors[b] = constraint._error("the grammar allows no token of the vocabulary here")
            bitmask[b] = -1
    return allowed_bits(bitmask.to(device, non_blocking=True), vocab_size), errors


def _bit(j: int) -> int:
    """Bit ``j`` of an int32 word as the signed value torch stores (bit 31 is the sign)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j

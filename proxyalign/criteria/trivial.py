"""The two endpoints of the rejection PGM: p alone (``base``) and q* alone (``aligned``)."""

from __future__ import annotations

import torch

from proxyalign.criteria.base import Criterion
from proxyalign.hookspecs import hookimpl


class Base(Criterion):
    """mu = 0: every draft from p is kept, so the output is p's. q* never runs (lazy path)."""

    name = "base"
    description = "Never reject: the large base model p alone."
    reference = "baseline"
    reads = frozenset({"p"})
    never_rejects = True

    def rejection(self, p, q_star=None, q=None) -> torch.Tensor:
        return torch.zeros_like(p)


class Aligned(Criterion):
    """mu = 1: every draft is rejected, so the output is q*'s. p never runs."""

    name = "aligned"
    description = "Always reject: the small aligned model q* alone."
    reference = "baseline"
    reads = frozenset()
    always_rejects = True

    def rejection(self, p, q_star=None, q=None) -> torch.Tensor:
        return torch.ones_like(p)


@hookimpl
def register_criteria(register) -> None:
    register(Base)
    register(Aligned)

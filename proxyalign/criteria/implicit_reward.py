"""Proxy tuning / implicit reward: shift p by the log-ratio of the small aligned and base models."""

from __future__ import annotations

import math

import torch

from proxyalign.criteria.base import TargetCriterion
from proxyalign.hookspecs import hookimpl


class ImplicitReward(TargetCriterion):
    """Target s ∝ p * q*/q: ``softmax(log p + log q* - log q)`` in float32.

    The engine calls :meth:`log_target` with exact log-probabilities, so a q that underflows to zero in
    float32 still has its true (very negative) log and the ratio stays right. Tokens with p_v = 0 or
    q*_v = 0 (filtered by top-k/top-p) get no mass. A row where p and q* share no support falls back to
    q*. This is also the target of reward-shifted speculative sampling (SSS, arXiv 2508.15044).
    """

    name = "implicit_reward"
    description = "Sample p * q*/q (proxy tuning); needs the small base model q."
    reference = "arXiv 2604.16146; Liu et al. 2024 (proxy tuning); arXiv 2508.15044"
    reads = frozenset({"p", "q_star", "q"})

    def log_target(self, log_p, log_q_star, log_q=None) -> torch.Tensor:
        if log_q is None:
            raise ValueError("criterion 'implicit_reward' needs the small base model q (pass small_base=...)")
        # q is never filtered, so the engine's log q is finite. Given as probabilities, an exact zero of q
        # is read as the smallest normal float (as target() does), not as an infinite ratio.
        floor = math.log(torch.finfo(log_q.dtype).tiny)
        scores = log_p + log_q_star - torch.where(torch.isneginf(log_q), floor, log_q)
        no_overlap = torch.isneginf(scores).all(dim=-1, keepdim=True)
        return torch.where(no_overlap, log_q_star, scores)

    def target(self, p, q_star, q=None) -> torch.Tensor:
        """From probabilities (the engine itself calls :meth:`log_target` with exact log-probabilities)."""
        if q is None:
            raise ValueError("criterion 'implicit_reward' needs the small base model q (pass small_base=...)")
        return torch.softmax(self.log_target(torch.log(p), torch.log(q_star), torch.log(q)), dim=-1)


@hookimpl
def register_criteria(register) -> None:
    register(ImplicitReward)

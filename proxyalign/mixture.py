"""Pure tensor math of the rejection PGM: no models, no tokenizers, no plugins.

Every function takes batched probability tensors ``[B, V]`` in float32 and keeps them on their device.
A *rejection criterion* is nothing but the vector ``mu`` in ``[0, 1]^V`` per row; the emitted token has

    pi(v) = p_v * (1 - mu_v) + q*_v * S,      S = sum_w p_w * mu_w

and can be drawn in two stages (draft from p, reject with prob. mu, resample from q*) so that the caller
also learns which model produced it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "RESIDUAL_FLOOR",
    "PGMDecomposition",
    "acceptance_probability",
    "accepted_lengths",
    "draft",
    "inverse_cdf",
    "pgm_decomposition",
    "pgm_target",
    "probs_at",
    "rejection_rate",
    "sample",
    "sample_inverse_cdf",
    "speculative_residual",
    "sss_literal_acceptance",
    "sss_literal_residual",
    "two_stage_sample",
]


def rejection_rate(p: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``S = sum_w p_w mu_w`` per row: the probability that p's draft is rejected. Shape ``[B]``."""
    return (p * mu).sum(dim=-1)


def pgm_target(p: torch.Tensor, q_star: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Closed-form distribution of the emitted token under rejection vector ``mu``."""
    s = rejection_rate(p, mu).unsqueeze(-1)
    return p * (1.0 - mu) + q_star * s


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from ``probs`` (``[B, V]`` -> ``[B]``); greedy callers use argmax instead."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def draft(
    p: torch.Tensor,
    mu: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First stage: draw ``w ~ p`` and decide whether it is rejected (with probability ``mu_w``).

    Returns ``(draft_ids [B], rejected [B] bool)``. Under greedy decoding the draft is ``argmax p`` and
    it is rejected when ``mu_w > 1/2`` (exact for the 0/1 criteria, a majority vote otherwise).
    This stage reads only p, which is what lets the engine keep q* lazily behind.
    """
    if greedy:
        w = p.argmax(dim=-1)
        mu_w = mu.gather(-1, w.unsqueeze(-1)).squeeze(-1)
        return w, mu_w > 0.5
    w = sample(p, generator)
    mu_w = mu.gather(-1, w.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(mu_w.shape, generator=generator, device=mu_w.device, dtype=mu_w.dtype)
    return w, u < mu_w


def two_stage_sample(
    p: torch.Tensor,
    q_star: torch.Tensor,
    mu: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from ``pgm_target(p, q_star, mu)`` and say which model produced each token.

    Returns ``(tokens [B], from_aligned [B] bool)``. The resample is from the *full* q* (the rejected
    token may come back), which is what makes the marginal equal ``pgm_target``.
    """
    w, rejected = draft(p, mu, generator, greedy=greedy)
    replacement = q_star.argmax(dim=-1) if greedy else sample(q_star, generator)
    return torch.where(rejected, replacement, w), rejected


class PGMDecomposition(NamedTuple):
    """A target written as a rejection PGM, where that is possible.

    ``mu`` is valid only on rows where ``holds`` is true; ``rate`` is the S used on those rows.
    """

    mu: torch.Tensor
    rate: torch.Tensor
    holds: torch.Tensor


def pgm_decomposition(
    p: torch.Tensor, q_star: torch.Tensor, target: torch.Tensor, atol: float = 1e-6
) -> PGMDecomposition:
    """Find ``mu`` with ``pgm_target(p, q_star, mu) == target`` when one exists.

    A target ``s`` is a PGM instance iff some S in [0, 1] satisfies
    ``max_v (s_v - p_v)/q*_v <= S <= min_v s_v/q*_v``; then ``mu_v = 1 - (s_v - q*_v S)/p_v``.
    We take the smallest feasible S so that as many tokens as possible are kept from p.
    Entries with ``q*_v = 0`` impose no bound of the first kind and ``+inf`` of the second.
    """
    pos_q = q_star > 0
    inf = torch.tensor(float("inf"), device=p.device, dtype=p.dtype)
    safe_q = torch.where(pos_q, q_star, torch.ones_like(q_star))
    lower_terms = torch.where(pos_q, (target - p) / safe_q, -inf)
    # Where q*_v = 0 the target must not exceed p_v either, or no S can fix it.
    excess_without_q = torch.where(pos_q, torch.zeros_like(p), target - p).amax(dim=-1)
    upper_terms = torch.where(pos_q, target / safe_q, inf)
    lower = lower_terms.amax(dim=-1).clamp(min=0.0)
    upper = upper_terms.amin(dim=-1).clamp(max=1.0)
    holds = (lower <= upper + atol) & (excess_without_q <= atol)
    rate = torch.minimum(lower, upper)
    kept = (target - q_star * rate.unsqueeze(-1)).clamp(min=0.0)
    safe_p = torch.where(p > 0, p, torch.ones_like(p))
    mu = torch.where(p > 0, 1.0 - kept / safe_p, torch.ones_like(p)).clamp(0.0, 1.0)
    return PGMDecomposition(mu=mu, rate=rate, holds=holds)


# -- speculative sampling with q* as the drafter (design §1, "Exact speculative hybrid") ---------------
#
# Shapes: ``B`` rows, ``G`` drafted tokens per row, ``V`` vocabulary. ``target`` is the per-position
# hybrid distribution pi_i, ``draft`` the distribution q*_i the drafts were sampled from.

#: Residual mass at or below this is floating-point noise: pi equals q* there (see ``speculative_residual``).
RESIDUAL_FLOOR = 1e-5


def probs_at(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The probability of each drafted token: ``probs[b, i, tokens[b, i]]`` (``[B, G, V]`` -> ``[B, G]``)."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def acceptance_probability(target_at: torch.Tensor, draft_at: torch.Tensor) -> torch.Tensor:
    """``min(1, pi_i(x_i) / q*_i(x_i))`` per drafted token; a draft always has ``q*_i(x_i) > 0``.

    The denominator is clamped only to keep a corrupted input from producing NaN.
    """
    tiny = torch.finfo(draft_at.dtype).tiny
    return (target_at / draft_at.clamp_min(tiny)).clamp(max=1.0)


def accepted_lengths(accept_prob: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Number of leading drafts accepted per row (``[B, G]`` -> ``[B]`` long, in ``0..G``).

    One uniform per draft; draft i counts only if drafts 1..i all pass (speculative sampling stops at
    the first rejection, later drafts are discarded unseen).
    """
    u = torch.rand(accept_prob.shape, generator=generator, device=accept_prob.device, dtype=accept_prob.dtype)
    passed = (u < accept_prob).long()
    return passed.cumprod(dim=-1).sum(dim=-1)


def _normalise_or(excess: torch.Tensor, fallback: torch.Tensor, floor: float) -> torch.Tensor:
    mass = excess.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(excess.dtype).tiny
    return torch.where(mass > floor, excess / mass.clamp_min(tiny), fallback)


def speculative_residual(
    target: torch.Tensor, draft: torch.Tensor, floor: float = RESIDUAL_FLOOR
) -> torch.Tensor:
    """``norm(max(0, pi - q*))``: where to sample after a rejected draft (``[B, V]``).

    A rejection happens with probability ``sum_v max(0, q*_v - pi_v)``, which equals the residual mass.
    When that mass is at most ``floor`` the two distributions agree up to rounding, the residual is
    rounding noise, and we return ``pi`` itself; the error this makes is below ``floor`` in total
    variation, because a rejection that reaches this branch has probability below ``floor``.
    """
    return _normalise_or((target - draft).clamp(min=0.0), target, floor)


def sss_literal_acceptance(p_at: torch.Tensor, q_at: torch.Tensor) -> torch.Tensor:
    """SSS paper's acceptance rule ``min(1, p(x)/q(x))`` (p: large base, q: small base).

    This is ``pi*/q*`` of the target ``pi* ∝ p q*/q`` *without* its normaliser, so the rule is
    approximate (design §1); the exact variant uses :func:`acceptance_probability` on the normalised target.
    """
    tiny = torch.finfo(q_at.dtype).tiny
    return (p_at / q_at.clamp_min(tiny)).clamp(max=1.0)


def sss_literal_residual(
    p: torch.Tensor,
    q_star: torch.Tensor,
    q: torch.Tensor,
    fallback: torch.Tensor,
    floor: float = RESIDUAL_FLOOR,
) -> torch.Tensor:
    """SSS paper's residual ``∝ max(0, q* (p/q - 1))`` (``[B, V]``).

    Where it has no mass (p <= q wherever q* > 0) it is undefined; ``fallback`` (the normalised target)
    is used there.
    """
    tiny = torch.finfo(q.dtype).tiny
    excess = (q_star * (p / q.clamp_min(tiny) - 1.0)).clamp(min=0.0)
    return _normalise_or(excess, fallback, floor)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative-probability interval holds ``u`` (``[N, V]``, ``[N]`` -> ``[N]``).

    Rows need not be normalised. The running sum is float64, so every token's interval is exact to
    ~1e-16; we take the first token whose cumulative sum reaches ``(1 - u) * total`` (in ``(0, total]``
    for ``u`` in ``[0, 1)``), so a zero-probability token (an empty interval) is never drawn. Several
    times faster than ``torch.multinomial`` on CPU over a 150k-token vocabulary, same distribution.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    point = (1 - u.to(cdf.dtype)).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, point).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row from ``probs`` (``[B, V]`` -> ``[B]``) by :func:`inverse_cdf`."""
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=torch.float64)
    return inverse_cdf(probs, u)

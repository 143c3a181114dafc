"""The hybrid's step as small pure functions: distributions -> criterion output -> tokens.

Both decoding modes and the conformance kit call these (in the spirit of gpt-fast's ``generate.py``);
nothing here knows models, caches, requests or the plugin registry. Every function works on any
number of rows and takes its randomness as explicit uniforms in ``[0, 1)``, drawn by the caller from
each request's own generator: a row's tokens depend on its own distributions and its own random
stream, never on the rows beside it.

- :func:`rejection_of` / :func:`target_of`: call a criterion the way the engine does (probabilities or
  exact log-probabilities in), check the shape at once and flag invalid values on the device;
- :func:`role_dists`: one model's logits -> the distributions the hybrid reads, with each row's sampling
  settings applied as that model's role needs them;
- :func:`hybrid_target`: pi per row, as its parts for a rejection criterion (``p (1 - mu) + q* S``);
- :func:`hybrid_log_pi`: the whole way from the models' logits to log pi, for engines that sample from
  a full distribution (the vLLM model of ``proxyalign-vllm``): the same two functions as above;
- :func:`sample_hybrid`: the two-stage draw (draft from p, reject with mu, resample from q*) with
  provenance; :func:`sample_target` for target-defined criteria (two stages where the target is a
  rejection PGM, a direct draw elsewhere); :func:`greedy_choice` for temperature 0;
- :func:`verify_drafts`: speculative acceptance of q*'s drafts against pi.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from proxyalign import mixture
from proxyalign.criteria.base import Criterion, CriterionKind
from proxyalign.engine.results import CODE, Source
from proxyalign.engine.sampling import Dists, RowSampling, model_dists
from proxyalign.errors import CriterionError, ProxyAlignError
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE

__all__ = [
    "Checked",
    "DenseTarget",
    "MixtureTarget",
    "Target",
    "call_rejection",
    "call_target",
    "criterion_error",
    "draft_from_p",
    "greedy_choice",
    "greedy_from",
    "hybrid_log_pi",
    "hybrid_target",
    "pick",
    "rejection_of",
    "role_dists",
    "sample_hybrid",
    "sample_target",
    "target_of",
    "verify_drafts",
    "verify_greedy",
]

_MU_TOLERANCE = 1e-5
_SUM_TOLERANCE = 1e-3


class Checked(NamedTuple):
    """A criterion's output, made safe to sample from, and a device flag saying it was invalid.

    The flag is read on the host later, with the step's one transfer; until then NaN or out-of-range
    values are replaced (``tensor``) so that nothing downstream crashes first. ``raw`` is the output
    as returned, for the error message.
    """

    invalid: torch.Tensor  #: [] bool
    tensor: torch.Tensor
    raw: torch.Tensor
    kind: str  #: "mu" or "target"


def criterion_error(criterion: Criterion, checked: Checked) -> CriterionError:
    """The :class:`CriterionError` for an output whose ``invalid`` flag came back true."""
    tensor = checked.raw
    nan = int(torch.isnan(tensor).sum())
    finite = tensor[torch.isfinite(tensor)]
    low = float(finite.min()) if finite.numel() else float("nan")
    high = float(finite.max()) if finite.numel() else float("nan")
    expectation = "values in [0, 1]" if checked.kind == "mu" else "a probability distribution per row"
    return CriterionError(
        f"criterion {criterion.label} returned invalid {checked.kind}: expected {expectation}, got "
        f"{nan} NaN value(s), finite range [{low:.4g}, {high:.4g}]"
    )


def _call(criterion: Criterion, method: str, *args: torch.Tensor | None) -> torch.Tensor:
    """Call a criterion method; an exception inside it (a plugin's bug) names the criterion and package."""
    try:
        return getattr(criterion, method)(*args)
    except ProxyAlignError:
        raise
    except Exception as exc:
        raise CriterionError(
            f"criterion {criterion.label} raised {type(exc).__name__} in {method}(): {exc}"
        ) from exc


def _check_shape(criterion: Criterion, what: str, tensor: object, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != like.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CriterionError(
            f"criterion {criterion.label} returned {what} of shape {shape}, expected {tuple(like.shape)}"
        )
    return tensor


def call_rejection(
    criterion: Criterion, p: Dists, q_star: Dists | None = None, q: Dists | None = None
) -> torch.Tensor:
    """mu exactly as the criterion returns it, asked the way the engine asks: on the criterion's view
    of each distribution, p alone for a lazy criterion (whose q* may not have run), and
    log-probabilities for a criterion that implements ``log_rejection``."""
    logs = type(criterion).log_rejection is not Criterion.log_rejection
    views = [None if d is None else (d.view_logprobs if logs else d.view) for d in (p, q_star, q)]
    method = "log_rejection" if logs else "rejection"
    if criterion.kind is CriterionKind.LAZY:
        return _call(criterion, method, views[0])
    if q_star is None:
        raise ValueError(f"criterion {criterion.label} reads q*, which is missing")
    return _call(criterion, method, *views)


def call_target(criterion: Criterion, p: Dists, q_star: Dists, q: Dists | None = None) -> torch.Tensor:
    """A target-defined criterion's pi from the sampled (tempered, filtered) distributions, as returned;
    a log-space criterion's log-scores are normalised here by a float32 softmax."""
    if criterion.reads_logprobs:
        logs = [None if d is None else d.logprobs for d in (p, q_star, q)]
        scores = _call(criterion, "log_target", *logs)
        if p.allowed is not None and isinstance(scores, torch.Tensor) and scores.shape == p.allowed.shape:
            scores = scores.masked_fill(~p.allowed, float("-inf"))  # log 0 - log 0 there would be NaN
        return torch.softmax(scores, dim=-1)
    pi = _call(criterion, "target", *(None if d is None else d.probs for d in (p, q_star, q)))
    if p.allowed is not None and isinstance(pi, torch.Tensor) and pi.shape == p.allowed.shape:
        pi = torch.where(p.allowed, pi, 0.0)  # the criterion over the constrained models, renormalised
        pi = pi / pi.sum(dim=-1, keepdim=True)
    return pi


def rejection_of(criterion: Criterion, p: Dists, q_star: Dists | None, q: Dists | None) -> Checked:
    """:func:`call_rejection`, shape-checked, with NaN / out-of-range values flagged on the device."""
    mu = _check_shape(criterion, "mu", call_rejection(criterion, p, q_star, q), p.probs).float()
    if p.allowed is not None:  # p has no mass on disallowed tokens: mu there is never used
        mu = torch.where(p.allowed, mu, 0.0)
    valid = (mu >= -_MU_TOLERANCE) & (mu <= 1 + _MU_TOLERANCE)  # NaN fails both
    return Checked(~valid.all(), torch.nan_to_num(mu, nan=0.0).clamp(0, 1), mu, "mu")


def target_of(criterion: Criterion, p: Dists, q_star: Dists, q: Dists | None) -> Checked:
    """:func:`call_target`, shape-checked, flagged on the device where it is not a distribution."""
    pi = _check_shape(criterion, "target", call_target(criterion, p, q_star, q), p.probs).float()
    ok = torch.isfinite(pi).all() & (pi >= 0).all() & ((pi.sum(dim=-1) - 1).abs() <= _SUM_TOLERANCE).all()
    safe = torch.where(ok, pi, p.probs)  # an invalid target is reported; p keeps the sampler safe
    return Checked(~ok, safe, pi, "target")


class DenseTarget(NamedTuple):
    """pi given as a full ``[N, V]`` tensor (target-defined criteria)."""

    probs: torch.Tensor

    def at(self, tokens: torch.Tensor) -> torch.Tensor:
        """``pi_n(tokens_n)`` per row (``[N]``)."""
        return mixture.probs_at(self.probs, tokens)

    def full(self) -> torch.Tensor:
        return self.probs


class MixtureTarget(NamedTuple):
    """pi = p (1 - mu) + q* S, kept as its parts: a speculative round reads pi at one token per row,
    so the full ``[N, V]`` mixture is built only where a whole distribution is needed."""

    p: torch.Tensor
    q_star: torch.Tensor
    mu: torch.Tensor
    rate: torch.Tensor

    def at(self, tokens: torch.Tensor) -> torch.Tensor:
        p, q_star, mu = (mixture.probs_at(t, tokens) for t in (self.p, self.q_star, self.mu))
        return p * (1 - mu) + q_star * self.rate

    def full(self) -> torch.Tensor:
        return self.p * (1 - self.mu) + self.q_star * self.rate.unsqueeze(-1)


Target = DenseTarget | MixtureTarget


def hybrid_target(
    criterion: Criterion, p: Dists, q_star: Dists, q: Dists | None = None
) -> tuple[Target, Checked]:
    """The distribution token-level decoding samples from, per row, and the output to validate."""
    if criterion.kind is CriterionKind.TARGET:
        checked = target_of(criterion, p, q_star, q)
        return DenseTarget(checked.tensor), checked
    checked = rejection_of(criterion, p, q_star, q)
    mu = checked.tensor
    return MixtureTarget(p.probs, q_star.probs, mu, mixture.rejection_rate(p.probs, mu)), checked


def role_dists(
    role: str,
    logits: torch.Tensor,
    vocab_size: int,
    rows: RowSampling,
    allowed: torch.Tensor | None = None,
) -> Dists:
    """One model's distributions as the hybrid reads them (``[N, V_model]`` logits -> ``[N, V]``): p and q*
    propose tokens, so each row's temperature and top-k/top-p apply; the small base q only informs a
    criterion, so it is tempered but never filtered. ``allowed``: the rows' grammar masks."""
    proposer = role != SMALL_BASE
    return model_dists(
        logits, vocab_size, rows if proposer else rows.unfiltered(), proposer=proposer, allowed=allowed
    )


def hybrid_log_pi(
    criterion: Criterion,
    logits: Mapping[str, torch.Tensor],
    vocab_size: int,
    rows: RowSampling,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Checked]:
    """log pi per row (``[N, V]``, ``-inf`` where pi is 0) from the models' logits by role (``"base"``,
    ``"aligned"``, and ``"small_base"`` for criteria that need q): exactly what token-level decoding
    samples from, through :func:`role_dists` and :func:`hybrid_target` as the engine's lanes call
    them. The :class:`Checked` flag says (on the device) whether the criterion's output was invalid;
    the returned log pi is then p's, as the engine's sampler would use."""
    dists = {role: role_dists(role, logits[role], vocab_size, rows, allowed) for role in logits}
    target, checked = hybrid_target(criterion, dists[BASE], dists[ALIGNED], dists.get(SMALL_BASE))
    return torch.log(target.full()), checked


# -- drawing tokens from explicit uniforms --------------------------------------------------------------
def pick(probs: torch.Tensor, u: torch.Tensor, greedy: torch.Tensor | None) -> torch.Tensor:
    """A draw from ``probs`` per row, or its argmax on greedy rows (``greedy``: [N] bool or None)."""
    if greedy is None:
        return mixture.inverse_cdf(probs, u)
    return torch.where(greedy, probs.argmax(dim=-1), mixture.inverse_cdf(probs, u))


def draft_from_p(
    p: torch.Tensor, mu: torch.Tensor, u: torch.Tensor, greedy: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First stage of the rejection PGM: ``w ~ p`` (``u[:, 0]``), rejected with probability ``mu_w``
    (``u[:, 1]``). Greedy rows draft ``argmax p`` and reject it when ``mu_w > 1/2`` (exact for 0/1
    criteria, a majority vote otherwise). Reads only p: what lets the engine keep q* lazily behind."""
    w = pick(p, u[:, 0], greedy)
    mu_w = mixture.probs_at(mu, w)
    rejected = u[:, 1] < mu_w.to(u.dtype)  # compared in float64: a float32 u could round up to 1
    if greedy is not None:
        rejected = torch.where(greedy, mu_w > 0.5, rejected)
    return w, rejected


def sample_hybrid(
    p: torch.Tensor,
    q_star: torch.Tensor,
    mu: torch.Tensor,
    u: torch.Tensor,
    greedy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from ``pi = p (1 - mu) + q* S`` in two stages and say which model produced each token.

    ``u``: ``[N, 3]`` uniforms (draft, rejection test, resample). Returns ``(tokens [N], from_aligned
    [N] bool)``. The resample is from the *full* q* (the rejected token may come back), which is what
    makes the marginal equal pi.
    """
    w, rejected = draft_from_p(p, mu, u, greedy)
    return torch.where(rejected, pick(q_star, u[:, 2], greedy), w), rejected


class TargetDraw(NamedTuple):
    tokens: torch.Tensor
    codes: torch.Tensor  #: BASE / ALIGNED where the target was a PGM, TARGET where drawn directly
    drafted: torch.Tensor  #: [N] bool: p drafted (the PGM held)
    rejected: torch.Tensor  #: [N] bool


def sample_target(
    p: torch.Tensor,
    q_star: torch.Tensor,
    pi: torch.Tensor,
    u: torch.Tensor,
    greedy: torch.Tensor | None = None,
) -> TargetDraw:
    """An exact draw from a target-defined criterion's ``pi`` with provenance where possible.

    Where pi is a rejection PGM of (p, q*) (:func:`proxyalign.mixture.pgm_decomposition`) the token is
    drawn in two stages, so it is known which model produced it; elsewhere directly from pi
    (``u[:, 2]``). Greedy rows take ``argmax pi``.
    """
    decomposition = mixture.pgm_decomposition(p, q_star, pi)
    tokens, rejected = sample_hybrid(p, q_star, decomposition.mu, u)
    holds = decomposition.holds
    if greedy is not None:
        holds = holds & ~greedy
    direct = pick(pi, u[:, 2], greedy)
    codes = torch.where(rejected, CODE[Source.ALIGNED], CODE[Source.BASE])
    return TargetDraw(
        torch.where(holds, tokens, direct),
        torch.where(holds, codes, CODE[Source.TARGET]),
        holds,
        holds & rejected,
    )


def greedy_from(target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level greedy decoding's token and source code per row, from the target's parts.

    Rejection criteria: ``argmax p``, handed to ``argmax q*`` when ``mu > 1/2`` there; target criteria:
    ``argmax pi``. A greedy speculative round accepts a draft exactly when it equals this token.
    """
    if isinstance(target, DenseTarget):
        tokens = target.probs.argmax(dim=-1)
        return tokens, torch.full_like(tokens, CODE[Source.TARGET])
    w = target.p.argmax(dim=-1)
    rejected = mixture.probs_at(target.mu, w) > 0.5
    tokens = torch.where(rejected, target.q_star.argmax(dim=-1), w)
    return tokens, torch.where(rejected, CODE[Source.ALIGNED], CODE[Source.BASE])


def greedy_choice(
    criterion: Criterion, p: Dists, q_star: Dists, q: Dists | None = None
) -> tuple[torch.Tensor, torch.Tensor, Checked]:
    """:func:`greedy_from` of the criterion's target, with the output to validate."""
    target, checked = hybrid_target(criterion, p, q_star, q)
    return (*greedy_from(target), checked)


# -- speculative verification ------------------------------------------------------------------------
def verify_drafts(
    target_at: torch.Tensor, draft_at: torch.Tensor, u: torch.Tensor, limit: torch.Tensor
) -> torch.Tensor:
    """Leading drafts accepted per row (``[B, G]`` -> ``[B]``): draft i passes with probability
    ``min(1, pi_i(x_i) / q*_i(x_i))`` (``u[:, i]``) and counts only if drafts ``0..i`` all passed and
    ``i < limit[b]`` (the row's own gamma; later drafts belong to other rows' rounds)."""
    accept = mixture.acceptance_probability(target_at.double(), draft_at.double())
    return _leading(u.double() < accept, limit)


def verify_greedy(drafts: torch.Tensor, choices: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Greedy speculation: the leading drafts equal to token-level greedy's choice, up to ``limit``."""
    return _leading(drafts == choices, limit)


def _leading(passed: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    within = torch.arange(passed.shape[1], device=passed.device) < limit.unsqueeze(-1)
    return (passed & within).long().cumprod(dim=-1).sum(dim=-1)

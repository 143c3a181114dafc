"""Independent reference distributions for the statistical tests, and exactness checks against them.

Nothing here imports the engine, :mod:`proxyalign.mixture` or the sampling code under test: next-token
distributions are computed in float64 numpy from each model's own logits (``model(ids).logits``), with
this module's own temperature, top-k and top-p. Only a criterion's ``rejection`` (not under test here)
is called, on these independently computed distributions.

Conventions (design §1):

- temperature divides the logits; then top-k, then top-p, both applied to the proposers p and q* only
  (never to the small base q), then a softmax renormalises over what is left;
- top-k keeps every token whose logit is >= the k-th largest (ties at the k-th value are all kept);
- top-p keeps the smallest set of most likely tokens whose cumulative probability reaches ``top_p``,
  computed after temperature and after top-k: a token is kept iff the mass of the tokens strictly more
  likely than it (in sorted order) is below ``top_p``, so the most likely token is always kept;
- the hybrid of a rejection criterion is ``pi = p_s (1 - mu) + q*_s * sum(p_s mu)`` with ``mu``
  computed on the criterion's view (the sampled, i.e. tempered and filtered, distributions for
  ``criterion_on="scaled"``; the untempered, unfiltered ones for ``"raw"``);
- ``implicit_reward`` is ``softmax(log p_s + log q*_s - log q_s)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tests.stats import ALPHA, chi_square_pvalue

#: A case is ill-conditioned when a filter's cut lies within this of its threshold: float32 (engine)
#: and float64 (here) could then disagree on the support, which is no bug of either.
CUT_MARGIN = 1e-4


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - top)
    return weights / weights.sum(axis=-1, keepdims=True)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    top = np.max(scores, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return scores - top - np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))


def top_k_keep(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the tokens top-k keeps: logit >= the k-th largest (ties all kept)."""
    k = min(k, scores.shape[-1])
    kth = np.sort(scores, axis=-1)[..., -k]
    return scores >= kth[..., None]


def top_p_keep(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the tokens top-p keeps: the smallest most-likely set whose mass reaches top_p."""
    probs = softmax(scores)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def filter_margins(
    logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> float:
    """How far the filters' cuts lie from their thresholds (min over rows; inf without filters).

    top-k: the gap between the k-th and (k+1)-th largest scaled logits; top-p: the smallest distance
    between ``top_p`` and the mass before any token (in sorted order).
    """
    scores = np.asarray(logits, dtype=np.float64) / temperature
    margin = np.inf
    if top_k is not None and top_k < scores.shape[-1]:
        ordered = np.sort(scores, axis=-1)[..., ::-1]
        margin = min(margin, float(np.min(ordered[..., top_k - 1] - ordered[..., top_k])))
        scores = np.where(top_k_keep(scores, top_k), scores, -np.inf)
    if top_p is not None and top_p < 1:
        probs = np.sort(softmax(scores), axis=-1)[..., ::-1]
        mass_before = np.cumsum(probs, axis=-1) - probs
        margin = min(margin, float(np.min(np.abs(mass_before - top_p))))
    return margin


def reference_probs(
    logits: np.ndarray | torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """float64 probabilities from logits ``[..., V]``: temperature, then top-k, then top-p."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().double().cpu().numpy()
    scores = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None:
        scores = np.where(top_k_keep(scores, top_k), scores, -np.inf)
    if top_p is not None and top_p < 1:
        scores = np.where(top_p_keep(scores, top_p), scores, -np.inf)
    return softmax(scores)


def criterion_mu(criterion, p_view: np.ndarray, q_star_view=None, q_view=None) -> np.ndarray:
    """The criterion's rejection vector on the given views (float32 in, as the engine feeds it)."""

    def tensor(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).float()

    with torch.no_grad():
        mu = criterion.rejection(tensor(p_view), tensor(q_star_view), tensor(q_view))
    return mu.double().clamp(0, 1).numpy()


def pgm_pi(p: np.ndarray, q_star: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``pi = p (1 - mu) + q* * sum(p mu)``, row-wise."""
    s = (p * mu).sum(axis=-1, keepdims=True)
    return p * (1 - mu) + q_star * s


def implicit_reward_pi(p: np.ndarray, q_star: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``softmax(log p + log q* - log q)``; a row where p and q* share no token falls back to q* (the
    criterion's documented rule for supports that filters made disjoint)."""
    overlap = ((p > 0) & (q_star > 0)).any(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = softmax(np.where(overlap, np.log(p) + np.log(q_star) - np.log(q), 0.0))
    return np.where(overlap, shifted, q_star)


def hybrid_pi(
    criterion,
    logits: dict[str, np.ndarray],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    criterion_on: str = "scaled",
) -> np.ndarray:
    """pi of ``criterion`` from raw logits per role (``"base"``, ``"aligned"``, optional ``"small_base"``).

    ``criterion`` is a built-in name's instance; ``base``/``aligned``/``implicit_reward`` are spelled
    out here, any other criterion is a rejection rule whose ``rejection`` gives mu.
    """
    sampled = {
        role: reference_probs(x, temperature, *((top_k, top_p) if role != "small_base" else (None, None)))
        for role, x in logits.items()
    }
    name = criterion.name
    if name == "base":
        return sampled["base"]
    if name == "aligned":
        return sampled["aligned"]
    if name == "implicit_reward":
        return implicit_reward_pi(sampled["base"], sampled["aligned"], sampled["small_base"])
    raw = criterion_on == "raw"
    views = {role: reference_probs(x) for role, x in logits.items()} if raw else sampled
    mu = criterion_mu(criterion, views["base"], views["aligned"], views.get("small_base"))
    return pgm_pi(sampled["base"], sampled["aligned"], mu)


# -- exactness checks --------------------------------------------------------------------------------
def noise_floor(exact: np.ndarray, draws: int, seed: int = 0, reps: int = 100) -> float:
    """Total variation a correct sampler reaches with ``draws`` samples: mean + 5 sd over simulations."""
    exact = np.asarray(exact, dtype=np.float64)
    exact = exact / exact.sum()
    counts = np.random.default_rng(seed).multinomial(draws, exact, size=reps)
    tvs = 0.5 * np.abs(counts / draws - exact).sum(axis=1)
    return float(tvs.mean() + 5 * tvs.std())


@dataclass(frozen=True)
class Check:
    """One histogram against its exact distribution."""

    what: str
    tv: float
    floor: float
    pvalue: float
    draws: int

    def line(self) -> str:
        return (
            f"{self.what}: TV {self.tv:.4f} (noise floor {self.floor:.4f}), "
            f"chi-square p={self.pvalue:.2e}, {self.draws} draws"
        )


def check(cells: np.ndarray, exact: np.ndarray, what: str) -> Check:
    """Compare sampled cell indices against the exact cell probabilities."""
    exact = np.asarray(exact, dtype=np.float64)
    exact = exact / exact.sum()
    cells = np.asarray(cells, dtype=np.int64)
    counts = np.bincount(cells, minlength=exact.size).astype(np.float64)
    assert counts.size == exact.size, f"{what}: a cell index is out of range"
    tv = 0.5 * float(np.abs(counts / counts.sum() - exact).sum())
    return Check(what, tv, noise_floor(exact, len(cells)), chi_square_pvalue(counts, exact), len(cells))


def assert_checks(checks: list[Check]) -> None:
    """Every histogram within its noise floor, and no chi-square rejection at family-wise level ALPHA.

    The checks of one test are one family: each chi-square p-value must exceed ``ALPHA / len(checks)``
    (Bonferroni), so a correct sampler fails a whole test with probability at most about ALPHA, as a
    single-histogram test does.
    """
    level = ALPHA / len(checks)
    bad = [c for c in checks if not (c.tv <= c.floor and c.pvalue > level)]
    report = "\n".join(("FAIL " if c in bad else "ok   ") + c.line() for c in checks)
    assert not bad, f"{len(bad)} of {len(checks)} checks failed (chi-square level {level:.1e}):\n{report}"

"""The conformance kit: every built-in criterion passes it, and it catches broken criteria.

Plugin packages run the same kit in their own tests (plugins/*/tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch

from proxyalign import Criterion, Param, TargetCriterion, mixture
from proxyalign.engine import hybrid
from proxyalign.plugins import build_registry
from proxyalign.testing import conformance
from proxyalign.testing.conformance import (
    ConformanceError,
    CriterionConformanceTests,
    check_criterion,
    goodness_of_fit,
)

#: The built-ins of design §1; a new built-in is picked up from the registry automatically below.
DOCUMENTED_BUILTINS = {
    "base",
    "aligned",
    "nudging",
    "dual_kad",
    "primal_kad",
    "confidence_bet",
    "implicit_reward",
}
BUILTINS = sorted(info.name for info in build_registry(load_entry_points=False).criteria())


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far slower when threads fight over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_documented_builtin_is_registered() -> None:
    assert set(BUILTINS) >= DOCUMENTED_BUILTINS


# One conformance class per built-in, looked up as "proxyalign:NAME" so that a plugin shadowing a
# bare name can never make us test the wrong class.
for _name in BUILTINS:
    _cls = type(
        f"TestBuiltin_{_name}", (CriterionConformanceTests,), {"criterion_name": f"proxyalign:{_name}"}
    )
    globals()[_cls.__name__] = _cls
del _name, _cls


class TestConfidenceBetZeroMargin(CriterionConformanceTests):
    criterion_name = "confidence_bet"
    criterion_params: ClassVar[dict[str, float]] = {"margin": 0.0}
    run_engine_check = False


class TestDualKadHighThreshold(CriterionConformanceTests):
    criterion_name = "dual_kad"
    criterion_params: ClassVar[dict[str, float]] = {"threshold": 0.9}
    run_engine_check = False


class TestPrimalKadLargeAlpha(CriterionConformanceTests):
    criterion_name = "primal_kad"
    criterion_params: ClassVar[dict[str, float]] = {"alpha": 0.9}
    run_engine_check = False


class TestNudgingFromFactory(CriterionConformanceTests):
    """The factory form: a criterion built in code rather than looked up by name."""

    run_engine_check = False

    def make_criterion(self) -> Criterion:
        from proxyalign.criteria.nudging import Nudging

        return Nudging(threshold=0.7)


def test_check_criterion_reports_every_check() -> None:
    report = check_criterion("proxyalign:dual_kad", skip=("engine",))
    assert report.skipped == ["engine"]
    assert set(report.passed) == set(conformance.CHECKS) - {"engine"}
    assert report.fits and all(fit.ok for fit in report.fits)
    assert "dual_kad" in str(report)


def test_check_criterion_accepts_instance_class_and_name() -> None:
    from proxyalign.criteria.kad import DualKad

    for criterion in (DualKad(threshold=0.3), DualKad, "dual_kad"):
        check_criterion(criterion, skip=("engine", "sampler"))
    check_criterion("dual_kad", {"threshold": 0.3}, skip=("engine", "sampler"))


def test_check_criterion_rejects_unknown_check_names() -> None:
    with pytest.raises(ValueError, match="unknown checks"):
        check_criterion("base", skip=("nope",))


# -- the statistics ------------------------------------------------------------------------------------
def test_goodness_of_fit_passes_exact_draws_for_many_seeds() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01, 1e-4, 1e-30, 0.0], dtype=torch.float64)
    for seed in range(30):
        draws = torch.multinomial(
            probs.float(), 40_000, replacement=True, generator=torch.Generator().manual_seed(seed)
        )
        fit = goodness_of_fit(torch.bincount(draws, minlength=len(probs)), probs)
        assert fit.ok, (seed, str(fit))


def test_goodness_of_fit_detects_a_small_bias() -> None:
    """A total-variation error of 0.03 (the size of SSS's literal rule's bias) is caught."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    biased = torch.tensor([0.43, 0.3, 0.17, 0.1], dtype=torch.float64)
    draws = torch.multinomial(
        biased.float(), 40_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    fit = goodness_of_fit(torch.bincount(draws, minlength=4), probs)
    assert not fit.ok and fit.pvalue < conformance.SIGNIFICANCE


def test_goodness_of_fit_flags_impossible_and_rare_tokens() -> None:
    probs = torch.tensor([0.7, 0.3 - 1e-9, 1e-9, 0.0], dtype=torch.float64)
    assert goodness_of_fit(torch.tensor([700, 299, 0, 1]), probs).impossible == 1
    rare = goodness_of_fit(torch.tensor([697, 296, 7, 0]), probs)  # 7 draws of a 1e-9 token
    assert rare.rare_pvalue < conformance.SIGNIFICANCE and not rare.ok


# -- broken criteria the kit must catch ---------------------------------------------------------------
class _Rule(Criterion):
    """A valid token rule used as the base of deliberately broken variants."""

    name = "kit_probe"
    description = "test double"
    params = (Param("threshold", 0.3, "bar"),)
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        return (p < self.params["threshold"]).to(p.dtype)


class MuAboveOne(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return 1.5 * super().rejection(p)


class NanOnZeros(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return super().rejection(p) + 0.0 * p * torch.log(p)  # 0 * log 0 = NaN on padded entries


class WrongShape(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return super().rejection(p)[:, :1]


class WrongDtype(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return super().rejection(p).float()


class BatchDependent(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return (p < 0.5 * p.amax()).to(p.dtype)  # compares with the top of the whole batch


class Random(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return torch.rand_like(p)


class InPlace(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return (p.clamp_(max=0.9) < self.params["threshold"]).to(p.dtype)


class HiddenQStar(_Rule):
    """Declares reads={'p'} (so the engine runs it lazily, without q*) but uses q* when present."""

    def rejection(self, p, q_star=None, q=None):
        if q_star is None:
            return super().rejection(p)
        return (p < q_star).to(p.dtype)


class NeedsUndeclaredQStar(_Rule):
    def rejection(self, p, q_star=None, q=None):
        return (p < q_star.amax(dim=-1, keepdim=True)).to(p.dtype)


class InconsistentTarget(_Rule):
    def target(self, p, q_star, q=None):
        return q_star


class Unvalidated(_Rule):
    def __init__(self, **params: Any) -> None:
        self.params = {"threshold": float(params.get("threshold", 0.3))}


class ColonName(_Rule):
    name = "pkg:rule"


class UnnormalisedTarget(TargetCriterion):
    name = "kit_probe_target"
    description = "test double"
    reads = frozenset({"p", "q_star"})

    def target(self, p, q_star, q=None):
        return p + q_star


BROKEN = [
    (MuAboveOne, "outside \\[0, 1\\]"),
    (NanOnZeros, "NaN"),
    (WrongShape, "shape"),
    (WrongDtype, "dtype"),
    (BatchDependent, "rows"),
    (Random, "same inputs"),
    (InPlace, "in place"),
    (HiddenQStar, "reads only p"),
    (NeedsUndeclaredQStar, "rejection\\(\\) failed|reads|NoneType|q_star"),
    (InconsistentTarget, "pgm_target"),
    (Unvalidated, "accepts"),
    (ColonName, "':'"),
    (UnnormalisedTarget, "sum to 1"),
]


@pytest.mark.parametrize(("cls", "message"), BROKEN, ids=[cls.__name__ for cls, _ in BROKEN])
def test_kit_catches_broken_criterion(cls: type[Criterion], message: str) -> None:
    with pytest.raises(ConformanceError, match=message):
        check_criterion(cls, skip=("engine",))


def test_sampler_check_catches_a_wrong_resample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A classic bug: resampling from q* *without* the rejected token is not the PGM's target."""

    def excluding_rejected(p, q_star, mu, u, greedy=None):
        w, rejected = hybrid.draft_from_p(p, mu, u, greedy)
        without = q_star.scatter(-1, w.unsqueeze(-1), 0.0)
        without = torch.where(without.sum(-1, keepdim=True) > 0, without, q_star)
        return torch.where(rejected, mixture.inverse_cdf(without, u[:, 2]), w), rejected

    monkeypatch.setattr(hybrid, "sample_hybrid", excluding_rejected)
    with pytest.raises(ConformanceError, match="do not follow"):
        conformance.check_sampler("dual_kad")


def test_sampler_check_catches_wrong_provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Right tokens, wrong labels: provenance must say which model produced each token."""
    real = hybrid.sample_hybrid

    def mislabelled(p, q_star, mu, u, greedy=None):
        tokens, rejected = real(p, q_star, mu, u, greedy)
        return tokens, torch.zeros_like(rejected)

    monkeypatch.setattr(hybrid, "sample_hybrid", mislabelled)
    with pytest.raises(ConformanceError, match="rejected drafts"):
        conformance.check_sampler("dual_kad")


@pytest.mark.skipif(not conformance.accelerator_devices(), reason="no GPU in this process")
@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_sample_correctly_on_the_accelerator(name: str) -> None:
    device = conformance.accelerator_devices()[0]
    conformance.check_sampler(f"proxyalign:{name}", device=device)
    conformance.check_dtypes_and_devices(f"proxyalign:{name}", devices=[device])

"""proxyalign-experimental: the formulas, the conformance kit, lazy q*, and use by name."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch
from proxyalign_experimental import ArgmaxOnly, EntropyGate, MaxGap, entropy

import proxyalign
from proxyalign import cli
from proxyalign.testing import tiny_aligner
from proxyalign.testing.conformance import CriterionConformanceTests

PACKAGE = "proxyalign-experimental"
NAMES = ("argmax_only", "entropy_gate", "max_gap")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far slower when threads fight over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- conformance -------------------------------------------------------------------------------------
class TestMaxGap(CriterionConformanceTests):
    criterion_name = "max_gap"


class TestMaxGapZeroMargin(CriterionConformanceTests):
    criterion_name = f"{PACKAGE}:max_gap"
    criterion_params: ClassVar[dict[str, float]] = {"margin": 0.0}
    run_engine_check = False


class TestArgmaxOnly(CriterionConformanceTests):
    criterion_name = "argmax_only"


class TestEntropyGate(CriterionConformanceTests):
    criterion_name = "entropy_gate"


class TestEntropyGateNegativeMargin(CriterionConformanceTests):
    criterion_name = "entropy_gate"
    criterion_params: ClassVar[dict[str, float]] = {"margin": -1.0}
    run_engine_check = False


# -- the formulas ------------------------------------------------------------------------------------
P = torch.tensor([[0.5, 0.35, 0.15], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])


def test_max_gap_is_relative_to_p_top() -> None:
    assert MaxGap(margin=0.2).rejection(P).tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    assert MaxGap(margin=1.0).rejection(P).sum() == 0  # nothing trails the top by more than 1


def test_argmax_only_keeps_the_argmax_and_ties() -> None:
    assert ArgmaxOnly().rejection(P).tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert torch.equal(ArgmaxOnly().rejection(P), MaxGap(margin=0.0).rejection(P))
    # its target: p's top token with p's confidence, q* otherwise; rejection rate 1 - max p
    q_star = torch.tensor([[0.2, 0.2, 0.6]])
    target = ArgmaxOnly().target(P[:1], q_star)
    assert torch.allclose(target, torch.tensor([[0.5 + 0.1, 0.1, 0.3]]))


def test_entropy_is_zero_safe() -> None:
    h = entropy(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]))
    assert torch.allclose(h.squeeze(-1), torch.tensor([0.0, math.log(2), 1.5 * math.log(2)]))


def test_entropy_gate_compares_entropies() -> None:
    p = torch.tensor([[0.4, 0.3, 0.3], [0.98, 0.01, 0.01]])
    q_star = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    gap = (entropy(p) - entropy(q_star)).squeeze(-1)  # about [0.69, -0.28]
    for margin in (-1.0, -0.5, 0.0, 0.5, 1.0):
        mu = EntropyGate(margin=margin).rejection(p, q_star)
        assert mu.tolist() == [[float(g > margin)] * 3 for g in gap.tolist()], margin
    with pytest.raises(ValueError, match="needs q_star"):
        EntropyGate().rejection(p)


def test_docstring_examples() -> None:
    import doctest

    import proxyalign_experimental

    assert doctest.testmod(proxyalign_experimental).failed == 0


def test_reads_let_the_engine_run_q_star_lazily() -> None:
    assert MaxGap().lazy_aligned and ArgmaxOnly().lazy_aligned
    assert not EntropyGate().lazy_aligned and EntropyGate().reads == {"p", "q_star"}


def test_listed_with_package_and_version() -> None:
    from importlib.metadata import version

    infos = {info.name: info for info in proxyalign.list_criteria() if info.package == PACKAGE}
    assert set(infos) == set(NAMES)
    assert {info.version for info in infos.values()} == {version(PACKAGE)}


# -- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aligner() -> proxyalign.ProxyAligner:
    return tiny_aligner("max_gap", criterion_params={"margin": 0.3})


@pytest.mark.parametrize("name", [*NAMES, f"{PACKAGE}:argmax_only"])
def test_every_rule_decodes_by_name(aligner: proxyalign.ProxyAligner, name: str) -> None:
    out = aligner.generate(["w5 w6", "w8 w9 w10"], max_new_tokens=8, seed=2, criterion=name)
    for g in out:
        assert 1 <= g.stats.new_tokens <= 8
        assert g.stats.rejected_drafts == g.stats.tokens_from_aligned


def test_lazy_q_star_skips_the_aligned_model_when_nothing_is_rejected(
    aligner: proxyalign.ProxyAligner,
) -> None:
    """max_gap reads p only: with margin 1 nothing is rejected, so q* never needs to run."""
    never = aligner.generate("w5 w6", max_new_tokens=10, seed=0, criterion_params={"margin": 1.0})[0]
    assert never.stats.rejected_drafts == 0
    assert never.stats.aligned_forwards == 0 < never.stats.base_forwards
    # argmax_only rejects often; q* then runs, but only on steps where a draft was rejected
    some = aligner.generate("w5 w6", max_new_tokens=10, seed=0, criterion="argmax_only")[0]
    assert some.stats.rejected_drafts > 0
    assert 0 < some.stats.aligned_forwards <= some.stats.rejected_drafts


def test_cli_lists_the_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["criteria", "--json"]) == 0
    listed = {c["qualified_name"]: c for c in json.loads(capsys.readouterr().out)["criteria"]}
    for name in NAMES:
        assert listed[f"{PACKAGE}:{name}"]["version"] == "0.1.0"
    assert listed[f"{PACKAGE}:max_gap"]["reads"] == ["p"]


def test_adapters_use_plugin_by_qualified_name(aligner: proxyalign.ProxyAligner) -> None:
    import langchain_proxyalign as lc
    import llama_index.llms.proxyalign as li

    name = f"{PACKAGE}:entropy_gate"
    chat = lc.ChatProxyAlign(
        aligner=aligner, criterion=name, criterion_params={"margin": -0.5}, max_tokens=5, seed=0
    )
    assert chat.invoke("w5 w6").response_metadata["criterion_params"] == {"margin": -0.5}
    llm = li.ProxyAlign(aligner=aligner, criterion="argmax_only", max_new_tokens=5, seed=0)
    raw = llm.complete("w5 w6").raw
    assert raw["criterion"] == "argmax_only"
    assert raw["proxyalign_stats"]["rejected_drafts"] == raw["proxyalign_stats"]["tokens_from_aligned"]

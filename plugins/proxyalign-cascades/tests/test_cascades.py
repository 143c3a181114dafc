"""proxyalign-cascades: the formulas, the conformance kit, and use by name as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from proxyalign_cascades import CascadeDiff, CascadeOpt, CascadeToken

import proxyalign
from proxyalign import cli, mixture
from proxyalign.testing import tiny_aligner
from proxyalign.testing.conformance import CriterionConformanceTests

PACKAGE = "proxyalign-cascades"
NAMES = ("cascade_diff", "cascade_opt", "cascade_token")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far slower when threads fight over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- conformance: by bare name, by package:name, and at non-default parameters ----------------------
class TestCascadeDiff(CriterionConformanceTests):
    criterion_name = "cascade_diff"


class TestCascadeDiffZeroMargin(CriterionConformanceTests):
    criterion_name = f"{PACKAGE}:cascade_diff"
    criterion_params: ClassVar[dict[str, float]] = {"margin": 0.0}
    run_engine_check = False


class TestCascadeOpt(CriterionConformanceTests):
    criterion_name = "cascade_opt"


class TestCascadeOptLargeAlpha(CriterionConformanceTests):
    criterion_name = "cascade_opt"
    criterion_params: ClassVar[dict[str, float]] = {"alpha": 5.0}
    run_engine_check = False


class TestCascadeToken(CriterionConformanceTests):
    criterion_name = "cascade_token"


class TestCascadeTokenZeroMargin(CriterionConformanceTests):
    criterion_name = "cascade_token"
    criterion_params: ClassVar[dict[str, float]] = {"margin": 0.0}
    run_engine_check = False


# -- the formulas ------------------------------------------------------------------------------------
P = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]])
Q_STAR = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.45, 0.45, 0.1]])


def test_diff_rejects_whole_step_when_p_trails_q_star() -> None:
    mu = CascadeDiff(margin=0.1).rejection(P, Q_STAR)
    # row 0: 0.5 < 0.8 - 0.1; row 1: 0.9 >= 0.7; row 2: 0.4 >= 0.45 - 0.1
    assert mu.tolist() == [[1.0] * 3, [0.0] * 3, [0.0] * 3]
    assert CascadeDiff(margin=0.0).rejection(P, Q_STAR)[2].tolist() == [1.0] * 3


def test_opt_scales_the_margin_with_total_variation() -> None:
    tv = 0.5 * (P - Q_STAR).abs().sum(-1)
    gap = Q_STAR.amax(-1) - P.amax(-1)
    for alpha in (0.0, 0.5, 1.0, 3.0):
        mu = CascadeOpt(alpha=alpha).rejection(P, Q_STAR)
        expected = (gap > alpha * tv).float().unsqueeze(-1).expand_as(P)
        assert torch.equal(mu, expected), alpha
    assert torch.equal(
        CascadeOpt(alpha=0.0).rejection(P, Q_STAR), CascadeDiff(margin=0.0).rejection(P, Q_STAR)
    )


def test_token_keeps_drafts_q_star_rates_near_its_top() -> None:
    mu = CascadeToken(margin=0.2).rejection(P, Q_STAR)
    assert mu.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    # margin 0 keeps only q*'s argmax (both tied tokens of row 2)
    assert CascadeToken(margin=0.0).rejection(P, Q_STAR)[2].tolist() == [0.0, 0.0, 1.0]


def test_token_target_is_the_papers_cascade_target() -> None:
    """pi(v) = p(v) 1[v in T] + q*(v) sum_{w not in T} p(w), T = {v: q*_v >= max q* - margin}."""
    crit = CascadeToken(margin=0.2)
    keep = (Q_STAR.amax(-1, keepdim=True) - 0.2 <= Q_STAR).float()
    expected = P * keep + Q_STAR * (P * (1 - keep)).sum(-1, keepdim=True)
    assert torch.allclose(crit.target(P, Q_STAR), expected)
    assert torch.allclose(mixture.pgm_target(P, Q_STAR, crit.rejection(P, Q_STAR)), expected)


def test_rules_need_q_star_and_say_so() -> None:
    for cls in (CascadeDiff, CascadeOpt, CascadeToken):
        crit = cls()
        assert "q_star" in crit.reads and not crit.lazy_aligned
        with pytest.raises(ValueError, match="needs q_star"):
            crit.rejection(P)


def test_params_are_validated() -> None:
    with pytest.raises(proxyalign.InvalidParameterError, match="margin"):
        proxyalign.get_criterion("cascade_diff", margin=1.5)
    with pytest.raises(proxyalign.InvalidParameterError, match="alpha"):
        proxyalign.get_criterion("cascade_opt", alpha=-1)
    assert proxyalign.get_criterion("cascade_token", margin="0.3").params == {"margin": 0.3}


def test_docstring_examples() -> None:
    import doctest

    import proxyalign_cascades

    assert doctest.testmod(proxyalign_cascades).failed == 0


# -- the registry ------------------------------------------------------------------------------------
def test_listed_with_package_and_version() -> None:
    from importlib.metadata import version

    infos = {info.name: info for info in proxyalign.list_criteria() if info.package == PACKAGE}
    assert set(infos) == set(NAMES)
    for info in infos.values():
        assert info.version == version(PACKAGE)
        assert info.qualified_name == f"{PACKAGE}:{info.name}"
        assert info.as_dict()["reference"].startswith("Narasimhan et al.")


# -- end to end: ProxyAligner and the CLI, by name ---------------------------------------------------
@pytest.fixture(scope="module")
def aligner() -> proxyalign.ProxyAligner:
    return tiny_aligner("cascade_diff")


def test_proxyaligner_uses_plugin_by_name(aligner: proxyalign.ProxyAligner) -> None:
    assert aligner.criterion.name == "cascade_diff"
    assert aligner.criterion.package == PACKAGE  # type: ignore[attr-defined]
    out = aligner.generate(["w5 w6 w7", "w9"], max_new_tokens=12, seed=0)
    again = aligner.generate(["w5 w6 w7", "w9"], max_new_tokens=12, seed=0)
    assert [g.token_ids for g in out] == [g.token_ids for g in again]
    for g in out:
        assert g.stats.drafts == g.stats.new_tokens
        assert g.stats.rejected_drafts == g.stats.tokens_from_aligned
    # margin 1 can never reject: max p >= 0 >= max q* - 1
    never = aligner.generate(
        "w5 w6", max_new_tokens=12, seed=0, criterion="cascade_diff", criterion_params={"margin": 1.0}
    )[0]
    assert never.stats.rejected_drafts == 0 and all(str(s) == "base" for s in never.sources)


@pytest.mark.parametrize("name", [*NAMES, f"{PACKAGE}:cascade_token"])
def test_every_rule_decodes(aligner: proxyalign.ProxyAligner, name: str) -> None:
    g = aligner.generate("w5 w6", max_new_tokens=8, seed=1, criterion=name)[0]
    assert 1 <= g.stats.new_tokens <= 8
    assert g.stats.tokens_from_base + g.stats.tokens_from_aligned == g.stats.new_tokens


def _save_tiny_pair(root: Path) -> tuple[Path, Path]:
    from proxyalign.testing.tiny import tiny_model, tiny_tokenizer

    dirs = []
    for seed, (role, layers) in enumerate((("base", 2), ("aligned", 1))):
        path = root / role
        tiny_model(seed, layers=layers).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


def test_cli_lists_plugin_with_package_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["criteria", "--json"]) == 0
    listed = {c["qualified_name"]: c for c in json.loads(capsys.readouterr().out)["criteria"]}
    for name in NAMES:
        entry = listed[f"{PACKAGE}:{name}"]
        assert entry["package"] == PACKAGE and entry["version"] == "0.1.0"


def test_cli_generates_with_plugin_criterion(
    model_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, aligned = model_dirs
    argv = [
        "generate",
        "--base",
        str(base),
        "--aligned",
        str(aligned),
        "--criterion",
        "cascade_diff",
        "--param",
        "margin=0.05",
        "--max-new-tokens",
        "6",
        "--seed",
        "0",
        "--json",
        "w5 w6",
    ]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["criterion"] == "cascade_diff" and payload["params"] == {"margin": 0.05}
    (generation,) = payload["generations"]
    assert 1 <= len(generation["token_ids"]) <= 6
    assert set(generation["sources"]) <= {"base", "aligned"}
    # an out-of-range parameter is refused with the parameter's name and range, exit status 2
    bad = argv[:]
    bad[bad.index("margin=0.05")] = "margin=3"
    assert cli.main(bad) == 2
    assert "margin" in capsys.readouterr().err


def test_console_script_end_to_end(model_dirs: tuple[Path, Path]) -> None:
    """The installed `proxyalign` command, in a fresh process, finds the plugin through its entry point."""
    script = Path(sys.executable).with_name("proxyalign")
    assert script.exists(), "the `proxyalign` console script is installed next to this Python"
    base, aligned = model_dirs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PROXYALIGN_DISABLE_PLUGINS", None)
    done = subprocess.run(
        [
            str(script),
            "generate",
            "--base",
            str(base),
            "--aligned",
            str(aligned),
            "--criterion",
            f"{PACKAGE}:cascade_token",
            "--max-new-tokens",
            "4",
            "--seed",
            "3",
            "--json",
            "w7",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["criterion"] == "cascade_token"
    assert len(payload["generations"][0]["token_ids"]) <= 4


# -- end to end through the LangChain and LlamaIndex adapters ---------------------------------------
def test_langchain_llm_and_chat_model_use_plugin_by_name(aligner: proxyalign.ProxyAligner) -> None:
    import langchain_proxyalign as lc

    llm = lc.ProxyAlignLLM(
        aligner=aligner, criterion="cascade_token", criterion_params={"margin": 0.2}, max_tokens=6, seed=0
    )
    (generation,) = llm.generate(["w5 w6"]).generations[0]
    info = generation.generation_info
    assert info["criterion"] == "cascade_token" and info["criterion_params"] == {"margin": 0.2}
    assert set(info["token_sources"]) <= {"base", "aligned"}
    chat = lc.ChatProxyAlign(aligner=aligner, criterion=f"{PACKAGE}:cascade_opt", max_tokens=6, seed=0)
    message = chat.invoke("w5 w6")
    assert message.response_metadata["criterion"] == "cascade_opt"
    assert message.response_metadata["proxyalign_stats"]["new_tokens"] >= 1


def test_llamaindex_llm_uses_plugin_by_name(aligner: proxyalign.ProxyAligner) -> None:
    import llama_index.llms.proxyalign as li

    llm = li.ProxyAlign(
        aligner=aligner, criterion="cascade_diff", criterion_params={"margin": 0.05}, max_new_tokens=6, seed=0
    )
    response = llm.complete("w5 w6")
    assert response.raw["criterion"] == "cascade_diff"
    assert response.raw["criterion_params"] == {"margin": 0.05}
    stats = response.raw["proxyalign_stats"]
    assert stats["tokens_from_base"] + stats["tokens_from_aligned"] == stats["new_tokens"] >= 1

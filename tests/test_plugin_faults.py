"""Faulty third-party plugins, as real installed distributions, and what a user then sees.

The throw-away distributions in tests/fixtures/plugins are built and pip-installed once per session
into a temporary directory (never into the environment); each test puts that directory on sys.path
and rebuilds the registry, exactly as if the user had `pip install`-ed them. docs/writing-a-criterion.md
documents each message checked here.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import proxyalign
from proxyalign import CriterionError, UnknownCriterionError, cli
from proxyalign import aligner as aligner_module
from proxyalign.plugins import DISABLE_ENV, Registry, get_criterion, reload_registry
from proxyalign.testing import tiny_aligner
from proxyalign.testing.conformance import ConformanceError, check_criterion

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
DISTRIBUTIONS = {
    "pa-fault-broken": "0.0.1",
    "pa-fault-collision": "0.0.2",
    "pa-fault-hooks": "0.0.3",
    "pa-fault-garbage": "0.0.4",
}
MODULE_PREFIX = "pa_fault_"
#: Decoding modes that evaluate the criterion itself (token level; exact speculative where it exists).
MODES = [m for m in ("token", "speculative") if m in getattr(aligner_module, "MODES", ("token",))]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far slower when threads fight over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install every fixture distribution into one temporary directory (once per session)."""
    sources = tmp_path_factory.mktemp("fault-sources")
    for name in DISTRIBUTIONS:  # build from a copy: setuptools writes build/ and egg-info in-tree
        shutil.copytree(FIXTURES / name, sources / name)
    site = tmp_path_factory.mktemp("fault-site")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            *(str(sources / name) for name in DISTRIBUTIONS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"could not pip-install the fixture plugins:\n{done.stdout}\n{done.stderr}")
    return site


def _forget_fixture_modules() -> None:
    for module in [m for m in sys.modules if m.startswith(MODULE_PREFIX)]:
        del sys.modules[module]


@pytest.fixture
def faulty(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """The registry as a user with all four faulty plugins installed gets it."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.syspath_prepend(str(plugin_site))  # also invalidates import caches
    _forget_fixture_modules()
    registry = reload_registry()
    yield registry
    monkeypatch.undo()
    _forget_fixture_modules()
    importlib.invalidate_caches()
    reload_registry()


def _failures(registry: Registry, package: str) -> dict[str, str]:
    return {f.plugin: f.error for f in registry.failures if f.package == package}


# -- a plugin that fails to import ---------------------------------------------------------------------
def test_import_failure_is_recorded_with_package_version_and_error(faulty: Registry) -> None:
    (failure,) = [f for f in faulty.failures if f.package == "pa-fault-broken"]
    assert failure.version == "0.0.1"
    assert failure.plugin == "pa-fault-broken:broken"
    assert "ImportError" in failure.error and "NoSuchThing" in failure.error
    assert str(failure).startswith("pa-fault-broken 0.0.1 (pa-fault-broken:broken): ImportError")


def test_other_plugins_still_load_after_an_import_failure(faulty: Registry) -> None:
    names = {info.qualified_name for info in faulty.criteria()}
    assert {"pa-fault-collision:collision_unique", "pa-fault-garbage:garbage_nan"} <= names
    assert {f"proxyalign:{n}" for n in ("base", "aligned", "dual_kad", "confidence_bet")} <= names


def test_user_sees_import_failure_in_criteria_listing(
    faulty: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["criteria"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap long lines
    assert "plugin not loaded: pa-fault-broken 0.0.1 (pa-fault-broken:broken): ImportError" in out
    assert cli.main(["criteria", "--json"]) == 0
    failures = json.loads(capsys.readouterr().out)["failures"]
    assert {
        "plugin": "pa-fault-broken:broken",
        "package": "pa-fault-broken",
        "version": "0.0.1",
    }.items() <= next(f for f in failures if f["package"] == "pa-fault-broken").items()


# -- a plugin that takes a built-in's name -------------------------------------------------------------
def test_collision_is_reported_with_both_providers_and_builtin_wins(faulty: Registry) -> None:
    providers = {info.qualified_name for info in faulty.collisions["dual_kad"]}
    assert providers == {"proxyalign:dual_kad", "pa-fault-collision:dual_kad"}
    assert faulty.lookup("dual_kad").package == "proxyalign"
    assert get_criterion("dual_kad").describe_params() == "threshold=0.4"  # the built-in's default


def test_hooks_run_in_registration_order(faulty: Registry) -> None:
    from proxyalign.plugins import build_registry

    builtins_only = list(build_registry(load_entry_points=False).by_qualified_name)
    assert builtins_only[:2] == ["proxyalign:base", "proxyalign:aligned"]  # BUILTIN_MODULES order
    providers = [info.qualified_name for info in faulty.collisions["dual_kad"]]
    assert providers == ["proxyalign:dual_kad", "pa-fault-collision:dual_kad"]


def test_package_colon_name_picks_either_provider(faulty: Registry) -> None:
    from proxyalign.criteria.kad import DualKad

    builtin = get_criterion("proxyalign:dual_kad")
    plugin = get_criterion("pa-fault-collision:dual_kad", threshold=0.5)
    assert type(builtin) is DualKad
    assert type(plugin).__module__ == "pa_fault_collision" and plugin.package == "pa-fault-collision"
    assert get_criterion("collision_unique").package == "pa-fault-collision"  # its other name is unaffected


def test_shadowed_plugin_criterion_decodes_by_qualified_name(faulty: Registry) -> None:
    aligner = tiny_aligner("pa-fault-collision:dual_kad")
    assert aligner.criterion.package == "pa-fault-collision"  # type: ignore[attr-defined]
    generation = aligner.generate("w5 w6", max_new_tokens=5, seed=0)[0]
    assert generation.stats.new_tokens >= 1


def test_user_sees_the_clash_in_criteria_listing(
    faulty: Registry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal, so rich does not abbreviate names
    assert cli.main(["criteria"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "name clash: 'dual_kad' is provided by " in out
    assert "'dual_kad' means proxyalign:dual_kad, use package:name for another" in out
    assert "pa-fault-collision:dual_kad (shadowed)" in out
    assert cli.main(["criteria", "--json"]) == 0
    collisions = json.loads(capsys.readouterr().out)["collisions"]
    assert sorted(collisions["dual_kad"]) == ["pa-fault-collision:dual_kad", "proxyalign:dual_kad"]


def test_unknown_qualified_name_lists_what_exists(faulty: Registry) -> None:
    with pytest.raises(UnknownCriterionError, match=r"qualified names: .*pa-fault-collision:dual_kad"):
        get_criterion("pa-fault-nope:dual_kad")


# -- hooks written wrong -------------------------------------------------------------------------------
def test_misspelled_undecorated_and_wrong_hooks_are_caught(faulty: Registry) -> None:
    errors = _failures(faulty, "pa-fault-hooks")
    assert set(errors) == {
        f"pa-fault-hooks:{n}" for n in ("misspelled", "undecorated", "wrong_args", "raising")
    }
    assert "register_criterion" in errors["pa-fault-hooks:misspelled"]
    assert "the hook is named 'register_criteria'" in errors["pa-fault-hooks:misspelled"]
    assert "no @hookimpl register_criteria(register) found" in errors["pa-fault-hooks:undecorated"]
    assert "callback" in errors["pa-fault-hooks:wrong_args"]
    assert "register() expects a Criterion subclass" in errors["pa-fault-hooks:raising"]
    assert all(f.version == "0.0.3" for f in faulty.failures if f.package == "pa-fault-hooks")
    with pytest.raises(UnknownCriterionError, match="unknown criterion 'hook_probe'"):
        get_criterion("hook_probe")


# -- criteria that return garbage ----------------------------------------------------------------------
@pytest.fixture
def garbage_aligner(faulty: Registry) -> proxyalign.ProxyAligner:
    return tiny_aligner("base")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("garbage_nan", r"returned invalid mu: expected values in \[0, 1\], got \d+ NaN"),
        ("garbage_shape", r"returned mu of shape \(\d+, 1\), expected \(\d+, 64\)"),
        (
            "garbage_range",
            r"returned invalid mu: expected values in \[0, 1\], got 0 NaN value\(s\), finite range \[2, 2\]",
        ),
        ("garbage_target", r"returned invalid target: expected a probability distribution per row"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_garbage_stops_generation_with_criterion_and_package(
    garbage_aligner: proxyalign.ProxyAligner, name: str, message: str, mode: str
) -> None:
    with pytest.raises(CriterionError, match=message) as caught:
        garbage_aligner.generate("w5 w6", max_new_tokens=4, seed=0, criterion=name, mode=mode)
    assert f"criterion '{name}' (package pa-fault-garbage)" in str(caught.value)


def test_garbage_stops_streaming_too(garbage_aligner: proxyalign.ProxyAligner) -> None:
    with pytest.raises(CriterionError, match="garbage_nan"):
        list(garbage_aligner.stream("w5", max_new_tokens=4, seed=0, criterion="garbage_nan"))


def test_exception_inside_criterion_names_criterion_and_package(
    garbage_aligner: proxyalign.ProxyAligner,
) -> None:
    with pytest.raises(CriterionError, match=r"'garbage_raises' \(package pa-fault-garbage\)"):
        garbage_aligner.generate("w5", max_new_tokens=2, seed=0, criterion="garbage_raises")


def test_exception_inside_criterion_propagates_today(garbage_aligner: proxyalign.ProxyAligner) -> None:
    with pytest.raises(RuntimeError, match="bug inside the plugin"):
        garbage_aligner.generate("w5", max_new_tokens=2, seed=0, criterion="garbage_raises")


@pytest.mark.parametrize(
    "name", ["garbage_nan", "garbage_shape", "garbage_range", "garbage_target", "garbage_raises"]
)
def test_conformance_kit_would_have_caught_the_garbage(faulty: Registry, name: str) -> None:
    with pytest.raises(ConformanceError, match=name):
        check_criterion(name, skip=("engine",))


def test_cli_exits_with_a_criterion_error(
    faulty: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxyalign.testing.tiny import tiny_model, tiny_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for seed, role in enumerate(("base", "aligned")):
        tiny_model(seed, layers=1).save_pretrained(tmp_path / role)
        tiny_tokenizer().save_pretrained(tmp_path / role)
    status = cli.main(
        [
            "generate",
            "--base",
            str(tmp_path / "base"),
            "--aligned",
            str(tmp_path / "aligned"),
            "--criterion",
            "garbage_range",
            "--max-new-tokens",
            "3",
            "--seed",
            "0",
            "--json",
            "w5",
        ]
    )
    assert status == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: criterion 'garbage_range' (package pa-fault-garbage) returned invalid mu" in err


# -- switching third-party plugins off -----------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_env_var_loads_only_builtins(faulty: Registry, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DISABLE_ENV, value)
    registry = reload_registry()
    assert registry.failures == [] and registry.collisions == {}
    assert {info.package for info in registry.criteria()} == {"proxyalign"}
    with pytest.raises(UnknownCriterionError):
        get_criterion("collision_unique")


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_env_var_other_values_keep_plugins(
    faulty: Registry, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(DISABLE_ENV, value)
    registry = reload_registry()
    assert "pa-fault-collision:collision_unique" in registry.by_qualified_name

"""The settings helpers both framework adapters share (``proxyalign.adapters``): loading or reusing the
engine, an adapter's settings in engine names, and their validation at construction."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxyalign import adapters
from proxyalign.errors import InvalidParameterError
from proxyalign.settings import DEFAULT_CRITERION
from proxyalign.testing import tiny_aligner


def settings_of(**values: Any) -> SimpleNamespace:
    """An adapter-like object: every field of its own unset unless given, no engine_kwargs."""
    fields = dict.fromkeys(adapters.SETTING_FIELDS)
    return SimpleNamespace(**{**fields, "engine_kwargs": {}, **values})


def test_a_given_aligner_is_used_as_it_is(aligner):
    assert adapters.adapter_aligner(aligner, None, None, None, None, {}) == (aligner, None)
    assert adapters.adapter_aligner(aligner, "b", "a", None, "nudging", {}) == (aligner, "nudging")


def test_an_aligner_or_both_model_ids_are_needed():
    with pytest.raises(ValueError, match=r"give either aligner=ProxyAligner\(...\) or both base"):
        adapters.adapter_aligner(None, "base-only", None, None, None, {})
    with pytest.raises(TypeError, match=r"aligner must be a proxyalign\.ProxyAligner, got str"):
        adapters.adapter_aligner("tiny", None, None, None, None, {})


def test_loading_fills_in_the_default_criterion(monkeypatch, aligner):
    loads = []
    monkeypatch.setattr(adapters, "shared_aligner", lambda *args: loads.append(args) or aligner)
    assert adapters.adapter_aligner(None, "b", "a", None, None, {"dtype": "x"}) == (
        aligner,
        DEFAULT_CRITERION,
    )
    assert adapters.adapter_aligner(None, "b", "a", "q", "nudging", {})[1] == "nudging"
    assert loads == [("b", "a", None, DEFAULT_CRITERION, {"dtype": "x"}), ("b", "a", "q", "nudging", {})]


def test_instance_settings_are_in_engine_names():
    adapter = settings_of(max_tokens=5, max_new_tokens=99, seed=1, criterion="nudging")
    adapter.engine_kwargs = {"mode": "speculative"}
    settings = adapters.instance_settings(adapter, renamed={"max_new_tokens": "max_tokens"})
    assert settings["max_new_tokens"] == 5 and settings["seed"] == 1 and settings["temperature"] is None
    assert list(settings) == [*adapters.SETTING_FIELDS[:-2], "mode", "criterion", "criterion_params"]
    assert adapters.instance_settings(settings_of(max_new_tokens=7))["max_new_tokens"] == 7


def test_check_settings_refuses_engine_kwargs_that_are_not_options_or_have_a_field(aligner):
    for engine_kwargs in ({"nope": 1}, {"temperature": 0.5}):
        with pytest.raises(ValueError, match="accepted: ") as info:
            adapters.check_settings(aligner, {}, engine_kwargs)
        assert "without a field of their own" in str(info.value)
        assert "'mode'" in str(info.value) and "'temperature'" not in str(info.value).split("accepted")[1]
    with pytest.raises(ValueError) as info:
        adapters.check_settings(aligner, {}, {"nope": 1}, list_accepted=False)
    assert str(info.value) == "engine_kwargs ['nope'] are not ProxyAligner.generate options"


def test_check_settings_checks_every_value_and_skips_unset_ones(aligner):
    adapters.check_settings(aligner, {"temperature": None, "mode": "speculative"}, {"mode": "speculative"})
    with pytest.raises(InvalidParameterError, match="temperature"):
        adapters.check_settings(aligner, {"temperature": -1}, {})
    with pytest.raises(InvalidParameterError, match="mode must be one of"):
        adapters.check_settings(aligner, {"mode": "warp"}, {"mode": "warp"})


def test_token_ids_and_completion_info(aligner):
    assert adapters.token_ids(aligner, "w5 w6 w7") == [5, 6, 7]
    generation = aligner.generate("w5 w6 w7", max_new_tokens=3, temperature=0)[0]
    criterion = aligner.resolve_criterion()
    info = adapters.completion_info(generation, "p+q", criterion)
    summary = adapters.summary(generation, "p+q", criterion)
    assert list(info) == [*summary, "token_ids", "token_sources"]
    assert info["token_ids"] == generation.token_ids and info["criterion"] == criterion.name


def test_naming_the_instance_criterion_again_keeps_its_params_only_in_the_adapters():
    """The two merges differ on purpose: an adapter's criterion and params are one configured setting
    that a call naming the same criterion refines; the engine's ``criterion=`` names a rule afresh."""
    pa = tiny_aligner("nudging", criterion_params={"threshold": 0.3})
    assert dict(pa.resolve_criterion("nudging").params) == {"threshold": 0.4}  # the rule's own default
    assert dict(pa.resolve_criterion(None, {}).params) == {"threshold": 0.3}
    assert adapters.merge_criterion("nudging", {"threshold": 0.3}, "nudging", None) == (
        "nudging",
        {"threshold": 0.3},
    )
    # Parameters alone refine the current criterion in both.
    assert dict(pa.resolve_criterion(None, {"threshold": 0.5}).params) == {"threshold": 0.5}
    assert adapters.merge_criterion("nudging", {"threshold": 0.3}, None, {"threshold": 0.5}) == (
        "nudging",
        {"threshold": 0.5},
    )
    # Another criterion starts from its own defaults in both.
    assert adapters.merge_criterion("nudging", {"threshold": 0.3}, "dual_kad", None) == ("dual_kad", None)

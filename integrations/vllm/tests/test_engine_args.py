"""engine_args checks everything before vLLM spends a minute starting (no engine here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from proxyalign.errors import InvalidParameterError, UnknownCriterionError

from proxyalign_vllm import ARCHITECTURE, HybridSettings, engine_args
from proxyalign_vllm.settings import SETTINGS_KEY


def test_arguments_carry_the_settings(tiny_dirs: dict[str, str]) -> None:
    args = engine_args(
        base=tiny_dirs["base"], aligned=tiny_dirs["aligned"], criterion="nudging", temperature=0.8, top_k=9
    )
    assert args["hf_overrides"]["architectures"] == [ARCHITECTURE]
    assert args["generation_config"] == "vllm"  # the checkpoint's sampling defaults do not apply
    settings = HybridSettings.from_json(args["hf_overrides"][SETTINGS_KEY])
    assert settings.criterion_params == {"threshold": 0.4}  # defaults filled in, validated
    assert settings.base_architectures == ("MistralForCausalLM",)
    assert settings.vocab_size == 64  # the tokenizers' vocabulary, not p's padded 72 rows
    assert (settings.temperature, settings.top_k, settings.sampling().top_k) == (0.8, 9, 9)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"criterion": "no_such"}, UnknownCriterionError, "no_such"),
        ({"criterion_params": {"threshold": 3}}, InvalidParameterError, "threshold"),
        ({"criterion_params": {"margin": 0.1}}, InvalidParameterError, "margin"),
        ({"criterion": "implicit_reward"}, InvalidParameterError, "small_base"),
        ({"aligned": "/nonexistent"}, InvalidParameterError, "aligned"),
        ({"aligned": "no-such-org/no-such-model"}, InvalidParameterError, "aligned: 'no-such-org"),
        ({"temperature": 0}, InvalidParameterError, "temperature"),
        ({"temperature": -1}, InvalidParameterError, "temperature"),
        ({"top_p": 1.5}, InvalidParameterError, "top_p"),
        ({"top_k": 0}, InvalidParameterError, "top_k"),
        ({"criterion_on": "both"}, InvalidParameterError, "criterion_on"),
        ({"tensor_parallel_size": 0}, InvalidParameterError, "tensor_parallel_size"),
        ({"pipeline_parallel_size": 2}, InvalidParameterError, "pipeline_parallel_size"),
        ({"hf_overrides": {}}, InvalidParameterError, "hf_overrides"),
    ],
)
def test_invalid_settings_fail_before_vllm(
    tiny_dirs: dict[str, str], change: dict[str, Any], error: type[Exception], match: str
) -> None:
    kwargs = {"base": tiny_dirs["base"], "aligned": tiny_dirs["aligned"], **change}
    with pytest.raises(error, match=match):
        engine_args(**kwargs)


def _with_heads(source: str, target: Path, heads: int, kv_heads: int) -> str:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def test_head_counts_must_split_over_tensor_parallel_ranks(tiny_dirs: dict[str, str], tmp_path: Path) -> None:
    six = _with_heads(tiny_dirs["aligned"], tmp_path / "six", 6, 2)
    with pytest.raises(
        InvalidParameterError, match=r"tensor_parallel_size=4 does not divide the aligned .* 6 "
    ):
        engine_args(base=tiny_dirs["base"], aligned=six, tensor_parallel_size=4)
    kv3 = _with_heads(tiny_dirs["aligned"], tmp_path / "kv3", 12, 3)
    with pytest.raises(InvalidParameterError, match="3 key/value heads"):
        engine_args(base=tiny_dirs["base"], aligned=kv3, tensor_parallel_size=2)
    # fewer KV heads than ranks is fine when they divide the ranks (vLLM replicates them)
    assert engine_args(base=tiny_dirs["base"], aligned=tiny_dirs["aligned"], tensor_parallel_size=4)

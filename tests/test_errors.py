"""Bad input through every front end: one exception type per kind, a message naming the parameter, the
error before any model loads or runs, and the same aligner decoding identically afterwards."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from pathlib import Path

import pytest

import proxyalign
from proxyalign.cli import main
from proxyalign.errors import InvalidParameterError, InvalidPromptError, ProxyAlignError
from proxyalign.testing import save_tiny_pair, tiny_aligner

PROMPT = "w5 w6 w7"

# (label, options, error type, a fragment the message must contain)
BAD_OPTIONS = [
    ("infinite temperature", {"temperature": math.inf}, InvalidParameterError, "temperature"),
    ("bool temperature", {"temperature": True}, InvalidParameterError, "temperature"),
    ("bool top_p", {"top_p": True}, InvalidParameterError, "top_p"),
    ("huge seed", {"seed": 2**70}, InvalidParameterError, "seed must be an integer in [0, 2**63)"),
    ("text seed", {"seed": "abc"}, InvalidParameterError, "seed"),
    ("NaN seed", {"seed": math.nan}, InvalidParameterError, "seed"),
    ("numeric-text seed", {"seed": "5"}, InvalidParameterError, "seed"),
    ("fractional seed", {"seed": 1.7}, InvalidParameterError, "seed"),
    ("int stop", {"stop": 5}, InvalidParameterError, "stop must be a string or a list"),
    ("dict stop", {"stop": {"a": 1}}, InvalidParameterError, "stop must be a string or a list"),
    ("empty stop string", {"stop": [""]}, InvalidParameterError, "non-empty strings"),
    ("list params", {"criterion_params": [0.2]}, InvalidParameterError, "criterion_params must be a mapping"),
    ("text params", {"criterion_params": "margin=0.2"}, InvalidParameterError, "criterion_params"),
    ("unknown mode", {"mode": "warp"}, InvalidParameterError, "mode must be one of"),
    ("bool max tokens", {"max_new_tokens": True}, InvalidParameterError, "max_new_tokens"),
    ("gamma zero", {"mode": "speculative", "gamma": 0}, InvalidParameterError, "gamma"),
]

BAD_PROMPTS = [
    ("lone surrogate", "w5 \ud800 w6", InvalidPromptError, "not valid Unicode"),
    ("bytes", b"bytes", InvalidPromptError, "bytes; decode it"),
    ("unknown role", [{"role": "robot", "content": "w5"}], InvalidPromptError, "role 'robot'"),
    ("None content", [{"role": "user", "content": None}], InvalidPromptError, "content must be text"),
    ("int content", [{"role": "user", "content": 5}], InvalidPromptError, "content must be text"),
    ("no content", [{"role": "user"}], InvalidPromptError, "has no 'content'"),
    ("one message, no list", {"role": "user", "content": "w5"}, InvalidPromptError, "list of messages"),
    ("empty chat", [[]], InvalidPromptError, "empty list of messages"),
    ("empty text", "  ", InvalidPromptError, "empty"),
]


@pytest.fixture(scope="module")
def pa():
    return tiny_aligner("confidence_bet")


@pytest.fixture(scope="module")
def reference(pa):
    return pa.generate(PROMPT, max_new_tokens=6, seed=3)[0].token_ids


def unchanged(pa, reference) -> None:
    assert pa.generate(PROMPT, max_new_tokens=6, seed=3)[0].token_ids == reference


# -- the Python API -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("label", "options", "error", "fragment"), BAD_OPTIONS, ids=[r[0] for r in BAD_OPTIONS]
)
def test_bad_options_through_the_api(pa, reference, label, options, error, fragment):
    for call in (pa.generate, pa.stream, pa.check_options):
        with pytest.raises(error) as info:
            if call == pa.check_options:
                call(**options)
            else:
                call(PROMPT, **{"max_new_tokens": 2, **options})
        assert fragment in str(info.value), label
    with pytest.raises(error, match=fragment.split(" ")[0]):
        asyncio.run(pa.agenerate(PROMPT, **{"max_new_tokens": 2, **options}))
    assert pa.status()["running"] == 0
    unchanged(pa, reference)


@pytest.mark.parametrize(
    ("label", "prompt", "error", "fragment"), BAD_PROMPTS, ids=[r[0] for r in BAD_PROMPTS]
)
def test_bad_prompts_through_the_api(pa, reference, label, prompt, error, fragment):
    with pytest.raises(error) as info:
        pa.generate(prompt, max_new_tokens=2)
    assert fragment in str(info.value) and "the prompt" in str(info.value), label
    with pytest.raises(error, match="prompt 1"):  # in a batch, the message says which prompt
        pa.generate(["w5", prompt], max_new_tokens=2)
    unchanged(pa, reference)


def test_an_empty_batch_is_named_as_such(pa):
    with pytest.raises(InvalidParameterError, match="prompts is empty"):
        pa.generate([], max_new_tokens=2)


def test_every_error_is_a_proxyalign_error():
    for error in (
        InvalidParameterError,
        InvalidPromptError,
        proxyalign.CriterionError,
        proxyalign.ModelLoadError,
    ):
        assert issubclass(error, ProxyAlignError)
    assert issubclass(InvalidPromptError, InvalidParameterError) and issubclass(
        InvalidParameterError, ValueError
    )


def test_bad_defaults_are_refused_at_construction():
    with pytest.raises(InvalidParameterError, match="temperature"):
        proxyalign.GenerationConfig(temperature=-1)
    with pytest.raises(InvalidParameterError, match="seed"):
        proxyalign.GenerationConfig(seed="x")


# -- the adapters ---------------------------------------------------------------------------------------
def test_langchain_settings_are_checked_at_construction_and_per_call(pa, reference):
    from langchain_proxyalign import ChatProxyAlign, ProxyAlignLLM

    for cls in (ChatProxyAlign, ProxyAlignLLM):
        for settings, fragment in (
            ({"temperature": -1}, "temperature"),
            ({"seed": 2**70}, "seed"),
            ({"engine_kwargs": {"mode": "warp"}}, "mode must be one of"),
            ({"stop": [""]}, "stop"),
        ):
            with pytest.raises(ValueError, match=fragment):
                cls(aligner=pa, **settings)
    chat = ChatProxyAlign(aligner=pa, max_tokens=4)
    with pytest.raises(ValueError, match="'max_tokens' and 'max_new_tokens' are the same setting"):
        chat.invoke(PROMPT, max_tokens=3, max_new_tokens=4)
    for _, options, _, fragment in BAD_OPTIONS[:6]:
        with pytest.raises(InvalidParameterError, match=fragment.split(" ")[0]):
            chat.invoke(PROMPT, **options)
    with pytest.raises(InvalidPromptError, match="not valid Unicode"):
        chat.invoke("w5 \ud800")
    replies = chat.batch([PROMPT, []], return_exceptions=True)
    assert isinstance(replies[1], Exception) and isinstance(replies[0].content, str)
    unchanged(pa, reference)


def test_llamaindex_settings_are_checked_at_construction_and_per_call(pa, reference):
    from llama_index.llms.proxyalign import ProxyAlign

    for settings, fragment in (
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": math.inf}, "temperature"),
        ({"engine_kwargs": {"mode": "warp"}}, "mode must be one of"),
    ):
        with pytest.raises(ValueError, match=fragment):
            ProxyAlign(aligner=pa, **settings)
    llm = ProxyAlign(aligner=pa, max_new_tokens=4)
    with pytest.raises(InvalidParameterError, match="seed"):
        llm.complete(PROMPT, seed="abc")
    with pytest.raises(InvalidParameterError, match="top_p"):
        asyncio.run(llm.acomplete(PROMPT, top_p=True))
    unchanged(pa, reference)


# -- the command line: one line, exit 2, before any model loads -------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--mode", "warp"], "mode must be one of"),
        (["--seed", str(10**25)], "seed"),
        (["--criterion", "no_such_rule"], "no_such_rule"),
        (["--criterion", "confidence_bet", "--param", "margin=7"], "margin"),
    ],
)
def test_cli_generate_checks_options_before_loading_models(capsys, options, fragment):
    """The model paths do not exist: an error about the option proves nothing was loaded first."""
    code, err = cli(capsys, "generate", "--base", "/no/such/p", "--aligned", "/no/such/q", *options, "w5")
    assert code == 2 and fragment in err and "Traceback" not in err


def test_cli_generate_checks_prompts_devices_and_paths_before_loading(capsys, tiny_dirs, tmp_path):
    base, aligned = tiny_dirs
    code, err = cli(capsys, "generate", "--base", "/no/such/p", "--aligned", "/no/such/q", "")
    assert code == 2 and "prompt 0 is empty" in err
    started = time.perf_counter()
    code, err = cli(capsys, "generate", "--base", base, "--aligned", "/no/such/q", "w5")
    assert code == 2 and "'/no/such/q' does not exist" in err
    code, err = cli(capsys, "generate", "--base", base, "--aligned", aligned, "--device", "gpu-please", "w5")
    assert code == 2 and "device" in err and "gpu-please" in err
    code, err = cli(capsys, "generate", "--base", base, "--aligned", str(tmp_path), "w5")
    assert code == 2 and "has no config.json" in err
    assert time.perf_counter() - started < 5, "these must fail before loading p"


def test_cli_generate_checks_the_context_window_before_loading_weights(capsys, tiny_dirs, tmp_path):
    """Weights removed from copies of the pair: the window error must come from the small files alone."""
    weightless = []
    for directory in tiny_dirs:
        copy = tmp_path / Path(directory).name
        shutil.copytree(directory, copy)
        for weights in copy.glob("*.safetensors"):
            weights.unlink()
        weightless.append(str(copy))
    base, aligned = weightless
    long_prompt = " ".join(["w5"] * 300)  # the tiny models' window is 256 tokens
    code, err = cli(capsys, "generate", "--base", base, "--aligned", aligned, long_prompt)
    assert code == 2 and "exceeds its context window of 256" in err and "Traceback" not in err, err
    models = ["--base", base, "--aligned", aligned]
    code, err = cli(capsys, "generate", *models, "--max-new-tokens", "256", "w5 w6 w7")
    assert code == 2 and "max_new_tokens=256" in err and "context window" in err, err


def test_cli_models_and_eval_errors_are_one_line(capsys, tmp_path):
    code, err = cli(capsys, "models", "fetch", "qwen2.5-coder-pair", "--dtype", "float8")
    assert code == 2 and "unsupported dtype 'float8'" in err and "Traceback" not in err
    code, err = cli(capsys, "eval", "--report-only", str(tmp_path / "nothing-here"))
    assert code == 2 and "no evaluation records" in err and not (tmp_path / "nothing-here").exists()
    models = ["--base", "/no/such/p", "--aligned", "/no/such/q"]
    for options, fragment in (
        (["--limit", "-1"], "limit"),
        (["--batch-size", "0"], "batch size"),
        (["--sweep", "margin"], "--sweep"),
        (["--datasets", f"mine={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
    ):
        code, err = cli(capsys, "eval", *models, *options, "--no-progress", "--output", str(tmp_path / "o"))
        assert code == 2 and fragment in err and "Traceback" not in err, (options, err)

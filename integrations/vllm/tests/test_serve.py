"""``proxyalign serve --engine vllm``: the checks before vLLM starts, and one real server (vLLM's own
OpenAI server with the hybrid, in a subprocess) answering the openai client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from proxyalign.cli import _build_parser
from proxyalign.errors import InvalidParameterError

from proxyalign_vllm.serve import build_flags, to_flags

KEY = "test-key"


def _args(dirs: dict[str, str], *more: str) -> Any:
    return _build_parser().parse_args(
        ["serve", "--engine", "vllm", "--base", dirs["base"], "--aligned", dirs["aligned"], *more]
    )


def test_to_flags() -> None:
    assert to_flags({"a_b": 1, "on": True, "off": False, "none": None, "d": {"x": [1]}, "l": ["p", "q"]}) == [
        "--a-b", "1", "--on", "--d", '{"x": [1]}', "--l", "p", "q",
    ]  # fmt: skip


def test_flags_carry_the_options(tiny_dirs: dict[str, str]) -> None:
    flags, parsed = build_flags(
        _args(
            tiny_dirs,
            *("--criterion", "nudging", "--param", "threshold=0.3", "--dtype", "float32", "--port", "8123"),
            *("--api-key", KEY, "--served-model-name", "hy", "--max-rows", "8"),
            "--vllm-args=--enforce-eager --max-model-len 128",
        )
    )
    assert parsed.model == str(os.path.realpath(tiny_dirs["base"]))
    assert parsed.hf_overrides["architectures"] == ["ProxyAlignHybrid"]
    assert '\\"threshold\\": 0.3' in flags[flags.index("--hf-overrides") + 1]
    assert (parsed.host, parsed.port, parsed.api_key) == ("127.0.0.1", 8123, [KEY])
    assert (parsed.served_model_name, parsed.max_num_seqs, parsed.dtype) == (["hy"], 8, "float32")
    assert (parsed.enforce_eager, parsed.max_model_len) == (True, 128)  # --vllm-args
    assert parsed.generation_config == "vllm"
    assert parsed.logits_processors == ["proxyalign_vllm.guard:HybridRequestGuard"]


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--max-n", "3"], "--max-n does not apply to --engine vllm"),
        (["--ray"], "--ray does not apply to --engine vllm"),
        (["--mode", "auto"], "--mode does not apply to --engine vllm"),
        (["--calibrate-rows", "2"], "--calibrate-rows does not apply to --engine vllm"),
        (["--max-cached-tokens", "100"], "KV cache by memory"),
        (["--host", "0.0.0.0"], "no --api-key"),  # the same rule as proxyalign's own server
        (["--port", "0"], "--port 0"),
        (["--vllm-args=--port 9"], "sets port, which proxyalign serve sets from --port"),
        (["--vllm-args=--hf-overrides {}"], "sets hf-overrides"),
        (["--vllm-args=--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--vllm-args=-tp 3"], "does not divide the base model's 4 attention heads"),
        (["--criterion", "implicit_reward"], "needs the small base model q"),
        (["--criterion", "dual_kad", "--param", "threshold=2"], "threshold"),
    ],
)
def test_refused_before_vllm_starts(tiny_dirs: dict[str, str], more: list[str], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(")):
        build_flags(_args(tiny_dirs, *more))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_dirs: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    command = [
        *(sys.executable, "-m", "proxyalign.cli", "serve", "--engine", "vllm"),
        *("--base", tiny_dirs["base"], "--aligned", tiny_dirs["aligned"], "--criterion", "dual_kad"),
        *("--dtype", "float32", "--port", str(port), "--served-model-name", "hybrid"),
        "--vllm-args=--enforce-eager --max-model-len 256 --max-logprobs -1",
    ]
    env = {**os.environ, "PROXYALIGN_API_KEY": KEY}  # the key from the environment, as documented
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{process.stdout.read()[-5000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer /health within 240 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_openai_client_against_vllm_server(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["hybrid"]

    completion = client.completions.create(model="hybrid", prompt="a b c", max_tokens=6, logprobs=3)
    choice = completion.choices[0]
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert choice.logprobs is not None and len(choice.logprobs.token_logprobs or []) == 6  # log pi

    chunks = list(
        client.completions.create(model="hybrid", prompt="a b", max_tokens=5, stream=True, n=2, seed=1)
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert len(chunks) >= 5 and all(isinstance(t, str) for t in texts.values())

    stream = client.chat.completions.create(
        model="hybrid", messages=[{"role": "user", "content": "a b"}], max_tokens=4, stream=True
    )
    deltas = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert deltas[-1].finish_reason in ("length", "stop")

    with pytest.raises(openai.BadRequestError):  # the request guard: pi is the engine's, not the request's
        client.completions.create(model="hybrid", prompt="a", max_tokens=2, temperature=0.5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()

"""``proxyalign serve``: the OpenAI-compatible server, driven by real clients over loopback.

A real uvicorn server runs in a background thread on a free 127.0.0.1 port, over a tiny random pair;
the real ``openai`` client, LangChain's ``ChatOpenAI`` and LlamaIndex's ``OpenAILike`` talk to it, and
every greedy answer must equal the same request decoded alone by the aligner itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn

from proxyalign import Criterion
from proxyalign.cli import main as cli_main
from proxyalign.engine.scheduler import SchedulerConfig
from proxyalign.server import ServerConfig, create_app
from proxyalign.server.cli import add_serve_arguments, build_server, calibration_rows
from proxyalign.testing import real_pair_dirs, save_tiny_pair, tiny_aligner

KEY = "test-key-123"
MODEL = "proxyalign"


class LiveServer:
    """uvicorn serving ``app`` from a background thread, on a socket bound here (a free loopback port)."""

    def __init__(self, app: Any = None, *, server: Any = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if server is None:
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)
        self.server = server
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def alone(pa: Any, prompt: Any, **options: Any) -> Any:
    """The same request decoded alone, straight on the aligner: what the server must answer."""
    return pa.generate([prompt], **options)[0]


def metric(text: str, name: str) -> float:
    """One sample's value from the Prometheus text format (``name`` with its labels, exactly)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# -- the shared server ------------------------------------------------------------------------------
CONFIG = ServerConfig(
    api_key=KEY,
    max_tokens=64,
    default_max_tokens=8,
    max_n=4,
    max_prompts=4,
    max_stop=3,
    max_prompt_tokens=100,
    max_body_bytes=16_384,
)


@pytest.fixture(scope="module")
def pa():
    aligner = tiny_aligner("dual_kad")
    yield aligner
    aligner.close()


@pytest.fixture(scope="module")
def live(pa):
    with LiveServer(create_app(pa, CONFIG)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(live):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=live.url, headers=headers, timeout=60) as c:
        yield c


# -- the real openai client ---------------------------------------------------------------------------
def test_models_health_and_metrics(live, client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{live.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = http.get("/metrics").text
    assert "proxyalign_running_rows" in text and "proxyalign_time_to_first_token_seconds" in text


def test_chat_and_completion_equal_the_aligner_alone(client, pa):
    messages = [{"role": "system", "content": "w40 w41"}, *chat("w5 w6 w7")]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    expected = alone(pa, messages, temperature=0, max_new_tokens=12)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.completion_tokens == expected.stats.new_tokens
    assert reply.usage.total_tokens == expected.stats.prompt_tokens + expected.stats.new_tokens
    provenance = choice.model_extra["proxyalign"]
    assert provenance["sources"] == [str(s) for s in expected.sources]
    assert provenance["token_ids"] == expected.token_ids
    assert provenance["criterion"] == "dual_kad"
    assert provenance["rejection_rate"] == pytest.approx(expected.stats.rejection_rate)

    done = client.completions.create(model=MODEL, prompt="w9 w10", temperature=0, max_tokens=10)
    expected = alone(pa, "w9 w10", temperature=0, max_new_tokens=10)
    assert done.choices[0].text == expected.text
    assert done.usage.completion_tokens == expected.stats.new_tokens
    assert done.choices[0].model_extra["proxyalign"]["token_ids"] == expected.token_ids


def test_streams_reassemble_to_the_unstreamed_text(client, pa):
    messages = chat("w12 w13")
    expected = alone(pa, messages, temperature=0, max_new_tokens=14)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=14,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.stats.new_tokens
    assert all("proxyalign" not in (c.choices[0].model_extra or {}) for c in chunks if c.choices)

    # n choices, streamed: each index reassembles to its own choice
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, seed=5, max_tokens=8, n=2, stream=True, extra_body={"top_k": 10}
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    expected_n = pa.generate([messages] * 2, seed=5, max_new_tokens=8, top_k=10)
    assert texts == [g.text for g in expected_n]

    pieces = list(
        client.completions.create(
            model=MODEL,
            prompt="w12 w13",
            temperature=0,
            max_tokens=14,
            stream=True,
            extra_body={"provenance": True},
        )
    )
    expected = alone(pa, "w12 w13", temperature=0, max_new_tokens=14)
    assert "".join(p.choices[0].text for p in pieces) == expected.text
    sources = [s for p in pieces for s in p.choices[0].model_extra["proxyalign"]["sources"]]
    assert sources == [str(s) for s in expected.sources]
    assert (
        pieces[-1].choices[0].model_extra["proxyalign"]["tokens_from_base"] == expected.stats.tokens_from_base
    )


def test_extensions_and_n_choices_reach_the_aligner(client, pa):
    options = {"criterion": "confidence_bet", "criterion_params": {"margin": 0.1}, "top_k": 20}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=chat("w20 w21"),
        temperature=0.8,
        top_p=0.9,
        seed=7,
        max_tokens=10,
        n=3,
        extra_body={**options, "mode": "speculative", "gamma": 3},
    )
    expected = pa.generate(
        [chat("w20 w21")] * 3,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        max_new_tokens=10,
        mode="speculative",
        gamma=3,
        **options,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [g.text for g in expected]
    assert reply.usage.prompt_tokens == expected[0].stats.prompt_tokens  # the prompt counts once
    assert reply.usage.completion_tokens == sum(g.stats.new_tokens for g in expected)
    assert reply.choices[0].model_extra["proxyalign"]["criterion"] == "confidence_bet"

    # several prompts x n: choice j*n+k; stop strings are cut
    done = client.completions.create(
        model=MODEL, prompt=["w5", "w30 w31"], n=2, seed=3, temperature=1.0, max_tokens=8, stop=["w50"]
    )
    expected = pa.generate(["w5", "w5", "w30 w31", "w30 w31"], seed=3, max_new_tokens=8, stop=["w50"])
    assert [c.text for c in done.choices] == [g.text for g in expected]
    # a per-model prompt (extension)
    per_role = {"base": "w7 w8 w9", "aligned": "w9"}
    done = client.completions.create(
        model=MODEL, prompt="x", max_tokens=6, temperature=0, extra_body={"prompt": per_role}
    )
    assert done.choices[0].text == alone(pa, per_role, temperature=0, max_new_tokens=6).text


def test_auto_mode_answers_and_counts_its_choices_in_metrics(client, http):
    """mode "auto" through the server: an answer of the asked length, and its steps by choice in /metrics."""

    def steps_by_choice() -> dict[str, float]:
        prefix = 'proxyalign_auto_steps_total{choice="'
        lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(prefix)]
        return {line[len(prefix) :].split('"')[0]: float(line.split()[-1]) for line in lines}

    before = steps_by_choice()
    reply = client.completions.create(
        model=MODEL, prompt="w5 w6", max_tokens=12, seed=1, extra_body={"mode": "auto", "gamma": 3}
    )
    assert reply.usage.completion_tokens == 12 or reply.choices[0].finish_reason == "stop"
    after = steps_by_choice()
    added = {choice: after[choice] - before.get(choice, 0) for choice in after}
    assert set(added) <= {"token"} | {f"gamma {g}" for g in range(1, 7)}
    assert 1 <= sum(added.values()) <= reply.usage.completion_tokens


def test_neutral_values_of_unsupported_parameters_are_accepted(client, pa):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "w44"},
            {"role": "user", "content": [{"type": "text", "text": "w6"}]},
        ],
        temperature=0,
        max_completion_tokens=5,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        user="someone",
    )
    expected = alone(pa, [{"role": "system", "content": "w44"}, *chat("w6")], temperature=0, max_new_tokens=5)
    assert reply.choices[0].message.content == expected.text


async def test_32_concurrent_clients_each_get_their_own_answer(live, pa):
    """Every client's answer equals its request decoded alone (greedy), usage included; streamed and
    unstreamed, chat and completions, all sharing the running batch."""
    prompts = [" ".join(f"w{4 + (i * 7 + j * 3) % 50}" for j in range(1 + i % 5)) for i in range(32)]
    lengths = [4 + (i * 5) % 17 for i in range(32)]
    expected = [
        alone(pa, chat(p) if i % 2 else p, temperature=0, max_new_tokens=n)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, pa.status()["running"])
            await asyncio.sleep(0.002)

    async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0) as client:

        async def one(i: int) -> tuple[str, int, int]:
            common = {"model": MODEL, "temperature": 0, "max_tokens": lengths[i]}
            stream = i % 4 >= 2
            if i % 2:
                kwargs = {"messages": chat(prompts[i]), **common}
                if not stream:
                    r = await client.chat.completions.create(**kwargs)
                    return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens
                chunks = [
                    c
                    async for c in await client.chat.completions.create(
                        **kwargs, stream=True, stream_options={"include_usage": True}
                    )
                ]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens
            kwargs = {"prompt": prompts[i], **common}
            if not stream:
                r = await client.completions.create(**kwargs)
                return r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens
            pieces = [
                p
                async for p in await client.completions.create(
                    **kwargs, stream=True, stream_options={"include_usage": True}
                )
            ]
            text = "".join(p.choices[0].text for p in pieces if p.choices)
            return text, pieces[-1].usage.prompt_tokens, pieces[-1].usage.completion_tokens

        watcher = asyncio.create_task(watch())
        try:
            answers = await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            watcher.cancel()
    for i, (text, prompt_tokens, completion_tokens) in enumerate(answers):
        assert text == expected[i].text, f"client {i} got another answer"
        assert (prompt_tokens, completion_tokens) == (
            expected[i].stats.prompt_tokens,
            expected[i].stats.new_tokens,
        )
    assert peak > 1, "the requests should have shared the running batch"


# -- LangChain and LlamaIndex, through their OpenAI clients ---------------------------------------------
def test_langchain_chat_openai_invoke_stream_and_batch(live, pa):
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{live.url}/v1", api_key=KEY, temperature=0, max_tokens=9, max_retries=0
    )
    expected = {
        p: alone(pa, chat(p), temperature=0, max_new_tokens=9).text for p in ("w5 w6", "w7", "w8 w9 w10")
    }
    assert llm.invoke("w5 w6").content == expected["w5 w6"]
    assert "".join(chunk.content for chunk in llm.stream("w7")) == expected["w7"]
    assert [m.content for m in llm.batch(list(expected))] == list(expected.values())


def test_llamaindex_openai_like_chat_and_complete(live, pa):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms import openai_like

    common = {
        "model": MODEL,
        "api_base": f"{live.url}/v1",
        "api_key": KEY,
        "temperature": 0.0,
        "max_tokens": 7,
    }
    llm = openai_like.OpenAILike(**common, is_chat_model=True, context_window=256)
    reply = llm.chat([ChatMessage(role="user", content="w11 w12")])
    assert reply.message.content == alone(pa, chat("w11 w12"), temperature=0, max_new_tokens=7).text
    llm = openai_like.OpenAILike(**common, is_chat_model=False, context_window=256)
    expected = alone(pa, "w13 w14", temperature=0, max_new_tokens=7).text
    assert llm.complete("w13 w14").text == expected
    assert "".join(r.delta or "" for r in llm.stream_complete("w13 w14")) == expected


# -- bad requests ---------------------------------------------------------------------------------------
GOOD = {"model": MODEL, "messages": chat("w5"), "max_tokens": 3}
BAD_REQUESTS = [
    # (name, path, body, status, text the message must contain)
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("negative temperature", "/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    (
        "temperature of the wrong type",
        "/v1/chat/completions",
        {**GOOD, "temperature": "hot"},
        422,
        "temperature",
    ),
    ("top_p above 1", "/v1/chat/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("top_k zero", "/v1/chat/completions", {**GOOD, "top_k": 0}, 400, "top_k"),
    ("max_tokens over the limit", "/v1/chat/completions", {**GOOD, "max_tokens": 100_000}, 400, "max_tokens"),
    (
        "max_tokens zero",
        "/v1/completions",
        {"model": MODEL, "prompt": "w5", "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens and max_completion_tokens disagree",
        "/v1/chat/completions",
        {**GOOD, "max_completion_tokens": 5},
        400,
        "max_completion_tokens",
    ),
    ("n over the limit", "/v1/chat/completions", {**GOOD, "n": 99}, 400, "n must"),
    ("negative seed", "/v1/chat/completions", {**GOOD, "seed": -1}, 400, "seed"),
    ("too many stop strings", "/v1/chat/completions", {**GOOD, "stop": ["a", "b", "c", "d"]}, 400, "stop"),
    ("empty stop string", "/v1/chat/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("logprobs", "/v1/chat/completions", {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("presence penalty", "/v1/chat/completions", {**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("tools", "/v1/chat/completions", {**GOOD, "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown parameter", "/v1/chat/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate"),
    ("echo", "/v1/completions", {"model": MODEL, "prompt": "w5", "echo": True}, 400, "echo"),
    (
        "stream_options without stream",
        "/v1/chat/completions",
        {**GOOD, "stream_options": {}},
        400,
        "stream_options",
    ),
    ("no messages field", "/v1/chat/completions", {"model": MODEL}, 422, "messages"),
    ("no model field", "/v1/chat/completions", {"messages": chat("w5")}, 422, "model"),
    ("empty messages", "/v1/chat/completions", {**GOOD, "messages": []}, 400, "messages"),
    (
        "function role",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "function", "name": "f", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "image part",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        "message without content",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "user"}]},
        400,
        "messages[0].content",
    ),
    ("unknown criterion", "/v1/chat/completions", {**GOOD, "criterion": "nope"}, 400, "nope"),
    (
        "criterion parameter out of range",
        "/v1/chat/completions",
        {**GOOD, "criterion": "dual_kad", "criterion_params": {"threshold": 7}},
        400,
        "threshold",
    ),
    ("unknown mode", "/v1/chat/completions", {**GOOD, "mode": "warp"}, 400, "mode"),
    ("gamma zero", "/v1/chat/completions", {**GOOD, "mode": "speculative", "gamma": 0}, 400, "gamma"),
    ("token-id prompt", "/v1/completions", {"model": MODEL, "prompt": [5, 6, 7]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("too many prompts", "/v1/completions", {"model": MODEL, "prompt": ["w5"] * 5}, 400, "prompt"),
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": "w5 " * 150}, 400, "at most 100"),
    ("lone surrogate", "/v1/completions", {"model": MODEL, "prompt": "w5 \ud800"}, 400, "Unicode"),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "route"),
]


@pytest.mark.parametrize(
    ("name", "path", "body", "status", "field"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_every_bad_request_gets_its_status_and_names_the_field(http, name, path, body, status, field):
    response = http.post(path, content=json.dumps(body))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in error["message"], error
    assert error["type"] and "Traceback" not in response.text


def test_malformed_requests_auth_size_and_method(live, http, client, pa):
    url = live.url
    cases = [
        (httpx.post(f"{url}/v1/chat/completions", json=GOOD), 401, "API key"),
        (
            httpx.post(f"{url}/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer wrong"}),
            401,
            "API key",
        ),
        (httpx.get(f"{url}/metrics"), 401, "API key"),
        (http.post("/v1/chat/completions", content=b"{not json"), 400, "JSON"),
        (http.post("/v1/chat/completions", content=b"x" * 20_000), 413, "16384 bytes"),
        (http.get("/v1/chat/completions"), 405, "Method Not Allowed"),
        (http.get("/v1/models/gpt-4"), 404, "model"),
    ]
    for response, status, text in cases:
        assert response.status_code == status, response.text
        assert text in response.json()["error"]["message"]
    assert cases[0][0].headers["www-authenticate"] == "Bearer"

    def chunked():  # a body without Content-Length, larger than the limit
        for _ in range(20):
            yield b"x" * 1000

    response = http.post("/v1/completions", content=chunked())
    assert response.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL, messages=chat("w5"), logprobs=True)
    # ... and the server keeps serving
    reply = client.chat.completions.create(model=MODEL, messages=chat("w5"), temperature=0, max_tokens=4)
    assert reply.choices[0].message.content == alone(pa, chat("w5"), temperature=0, max_new_tokens=4).text
    assert pa.status()["running"] == 0


class _Busy:
    """The tiny aligner, reporting a full batch and a queue (to test admission without a real crowd)."""

    def __init__(self, aligner: Any, waiting: int) -> None:
        self._aligner, self._waiting = aligner, waiting

    def status(self) -> dict[str, Any]:
        status = self._aligner.status()
        return {**status, "running": status["max_rows"], "waiting": self._waiting}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aligner, name)


async def test_a_full_queue_answers_429_and_a_draining_server_503(pa):
    app = create_app(_Busy(pa, waiting=3), ServerConfig(max_waiting=4, retry_after_s=2))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        ok = await http.post("/v1/chat/completions", json=GOOD)
        assert ok.status_code == 200, ok.text  # one more row still fits in the queue
        busy = await http.post("/v1/chat/completions", json={**GOOD, "n": 2})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "2"
        assert (
            busy.json()["error"]["type"] == "rate_limit_error" and "busy" in busy.json()["error"]["message"]
        )
        app.state.service.draining = True
        gone = await http.post("/v1/completions", json={"model": MODEL, "prompt": "w5"})
        assert gone.status_code == 503 and gone.headers["retry-after"] == "2"
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        text = (await http.get("/metrics")).text
    assert metric(text, 'proxyalign_requests_total{endpoint="chat",outcome="rejected"}') == 1
    assert metric(text, 'proxyalign_requests_total{endpoint="completion",outcome="unavailable"}') == 1
    assert metric(text, 'proxyalign_requests_total{endpoint="chat",outcome="success"}') == 1
    assert app.state.service.rows_in_flight == 0


async def test_ignore_unsupported_lets_them_through(pa):
    app = create_app(pa, ServerConfig(ignore_unsupported=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        body = {**GOOD, "logprobs": True, "presence_penalty": 1.5, "frobnicate": 1, "temperature": 0}
        reply = await http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    expected = alone(pa, chat("w5"), temperature=0, max_new_tokens=3)
    assert reply.json()["choices"][0]["message"]["content"] == expected.text


class Broken(Criterion):
    """Returns NaN: the engine fails the requests that use it, and only those."""

    name = "broken_server_test"
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        return torch.full_like(p, float("nan"))


async def test_a_failing_criterion_is_a_clean_500_or_an_error_event():
    aligner = tiny_aligner(Broken())
    try:
        app = create_app(aligner, ServerConfig())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            reply = await http.post("/v1/chat/completions", json=GOOD)
            assert reply.status_code == 500 and "Traceback" not in reply.text
            error = reply.json()["error"]
            assert error["code"] == "criterion_error" and "broken_server_test" in error["message"]
            streamed = await http.post("/v1/chat/completions", json={**GOOD, "stream": True})
            events = [
                line.removeprefix("data: ")
                for line in streamed.text.splitlines()
                if line.startswith("data: ")
            ]
            assert json.loads(events[-2])["error"]["code"] == "criterion_error" and events[-1] == "[DONE]"
            fine = await http.post("/v1/chat/completions", json={**GOOD, "criterion": "dual_kad"})
            assert fine.status_code == 200, "the server keeps serving"
            text = (await http.get("/metrics")).text
        assert metric(text, 'proxyalign_requests_total{endpoint="chat",outcome="failed"}') == 2
    finally:
        aligner.close()


# -- clients that leave, and shutting down -------------------------------------------------------------------
class Slow(Criterion):
    """p alone, slowly: keeps requests decoding long enough to leave or shut down mid-way."""

    name = "slow_server_test"
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        time.sleep(0.01)
        return torch.zeros_like(p)


@pytest.fixture
def slow():
    """An aligner of its own (so its totals are this test's), slow, and never stopping at EOS."""
    aligner = tiny_aligner(Slow(), scheduler=SchedulerConfig(max_rows=8))
    aligner.eos_token_ids = frozenset()
    aligner.engine.eos_ids = frozenset()
    yield aligner
    aligner.close()


def sse_lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def test_a_client_killed_mid_stream_leaves_the_batch_and_the_others_finish(slow):
    expected = {p: alone(slow, chat(p), temperature=0, max_new_tokens=25).text for p in ("w5", "w6 w7", "w8")}
    with LiveServer(create_app(slow, ServerConfig())) as live:
        results: dict[str, str] = {}

        def neighbour(prompt: str) -> None:
            with openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0) as c:
                stream = c.chat.completions.create(
                    model=MODEL, messages=chat(prompt), temperature=0, max_tokens=25, stream=True
                )
                results[prompt] = "".join(x.choices[0].delta.content or "" for x in stream if x.choices)

        threads = [threading.Thread(target=neighbour, args=(p,)) for p in expected]
        for t in threads:
            t.start()
        victim = {"model": MODEL, "messages": chat("w9"), "max_tokens": 200, "stream": True}
        with (
            httpx.Client(base_url=live.url, timeout=30) as http,
            http.stream("POST", "/v1/chat/completions", json=victim) as r,
        ):
            lines = sse_lines(r)
            next(lines), next(lines), next(lines)  # the role, then two pieces of text
            assert slow.status()["running"] >= 1
        # the connection is closed: the victim's row must leave while its neighbours decode on
        wait_until(lambda: slow.status()["totals"].get("aborted", 0) == 1)
        for t in threads:
            t.join(30)
        assert results == expected
        wait_until(lambda: slow.status()["running"] == 0)
        text = httpx.get(f"{live.url}/metrics").text
        assert metric(text, 'proxyalign_engine_rows_total{state="aborted"}') == 1
        assert metric(text, 'proxyalign_requests_total{endpoint="chat",outcome="disconnected"}') == 1
        assert metric(text, 'proxyalign_requests_total{endpoint="chat",outcome="success"}') == 3
        assert metric(text, "proxyalign_running_rows") == 0

        # a non-streamed request whose client gives up is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{live.url}/v1/completions",
                json={"model": MODEL, "prompt": "w5", "max_tokens": 200},
                timeout=0.5,
            )
        wait_until(lambda: slow.status()["totals"].get("aborted", 0) == 2)
        wait_until(lambda: slow.status()["running"] == 0)


def test_sigterm_drains_running_requests_then_stops(slow):
    config = ServerConfig(drain_s=1.5)
    live = LiveServer(server=build_server(slow, config, log_level="warning"))
    with live:
        done: dict[str, list[str]] = {}

        def stream(name: str, max_tokens: int) -> None:
            body = {"model": MODEL, "prompt": "w5", "max_tokens": max_tokens, "stream": True}
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as r:
                done[name] = []
                try:
                    for line in sse_lines(r):
                        done[name].append(line)
                except httpx.HTTPError:
                    pass  # cut off by the end of the drain

        short = threading.Thread(target=stream, args=("short", 20))
        long = threading.Thread(target=stream, args=("long", 240))  # about 3 s: longer than the drain
        short.start(), long.start()
        wait_until(lambda: slow.status()["running"] == 2)
        started = time.monotonic()
        live.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert app_of(live).state.service.draining
        short.join(30), long.join(30)
        live.thread.join(30)
        elapsed = time.monotonic() - started
    assert done["short"][-1] == "[DONE]", "a request running at SIGTERM should finish"
    assert "[DONE]" not in done["long"], "a request longer than the drain time is cut off"
    assert elapsed < config.drain_s + 5
    wait_until(lambda: slow.status()["running"] == 0)
    assert slow.status()["totals"].get("aborted", 0) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{live.url}/health")


def app_of(live: LiveServer) -> Any:
    return live.server.config.app


# -- the command line --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "--api-key"),
        (["--max-n", "0"], "--max-n"),
        (["--port", "70000"], "--port"),
        (["--criterion", "nope"], "nope"),
        (["--param", "threshold"], "NAME=VALUE"),
        (["--default-max-tokens", "9000"], "default_max_tokens"),
        (["--gamma", "0"], "--gamma must be an integer in [1, 64] or 'adaptive'"),
        (["--calibrate-rows", "65"], "--calibrate-rows must be between 0 and --max-rows (64)"),
        (["--mode", "sss"], "implicit_reward"),  # an sss mode's default criterion needs --small-base
    ],
)
def test_serve_checks_its_options_before_loading_anything(capsys, args, message):
    status = cli_main(["serve", "--base", "/no/such/model", "--aligned", "/no/such/either", *args])
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "rows"),
    [
        ([], 0),
        (["--mode", "auto"], 8),
        (["--mode", "auto", "--max-rows", "4"], 4),
        (["--calibrate-rows", "2"], 2),
    ],
)
def test_serve_calibrates_auto_before_serving_by_default_only_in_mode_auto(args, rows):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert calibration_rows(parser.parse_args(["--base", "p", "--aligned", "q", *args])) == rows


def test_serve_refuses_a_missing_model_and_a_taken_port(capsys, tmp_path):
    assert cli_main(["serve", "--base", str(tmp_path / "none"), "--aligned", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    base, aligned = save_tiny_pair(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert cli_main(["serve", "--base", base, "--aligned", aligned, "--port", port]) == 2
    assert "cannot listen" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_proxyalign_serve_end_to_end_and_sigterm(tmp_path):
    """The installed command: loads the tiny pair from disk, measures auto's costs before it answers
    (``--mode auto``: the default of requests that name no mode), answers the openai client, exits 0 on
    SIGTERM."""
    base, aligned = save_tiny_pair(tmp_path)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROXYALIGN_API_KEY": KEY}
    command = [sys.executable, "-m", "proxyalign.cli", "serve", "--base", base, "--aligned", aligned]
    command += ["--criterion", "dual_kad", "--param", "threshold=0.3", "--mode", "auto", "--gamma", "3"]
    command += ["--calibrate-rows", "2", "--port", str(port), "--log-level", "info"]
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0) as c:
            reply = c.chat.completions.create(
                model=MODEL, messages=chat("w5 w6"), temperature=0, max_tokens=5
            )
            assert reply.choices[0].model_extra["proxyalign"]["criterion"] == "dual_kad"
            assert reply.usage.completion_tokens == len(reply.choices[0].model_extra["proxyalign"]["sources"])
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        auto_steps = [line for line in metrics.text.splitlines() if line.startswith("proxyalign_auto_steps")]
        assert sum(float(line.split()[-1]) for line in auto_steps if "_total{" in line) >= 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        text = log.read_text()
        calibrated = text.index("measured the forward costs of mode auto up to 2 rows")
        assert calibrated < text.index("serving 'proxyalign' at"), "costs are measured before serving"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- the real pair -----------------------------------------------------------------------------------------
@pytest.mark.real_weights
def test_real_pair_behind_the_openai_client():
    import proxyalign

    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        pytest.skip("real pair not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
    pair = proxyalign.ProxyAligner.from_pretrained(
        str(dirs[0]),
        str(dirs[1]),
        dtype="bfloat16",
        device="cpu",
        criterion="confidence_bet",
        prompt_formats={"base": "plain", "aligned": "chat"},
    )
    messages = chat("Write a Python function that returns the square of a number.")
    try:
        expected = alone(pair, messages, temperature=0, max_new_tokens=6)
        live = LiveServer(create_app(pair, ServerConfig()))
        with live, openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0) as c:
            reply = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
            assert reply.choices[0].message.content == expected.text
            assert reply.usage.completion_tokens == expected.stats.new_tokens
            stream = c.chat.completions.create(
                model=MODEL, messages=messages, temperature=0, max_tokens=6, stream=True
            )
            assert "".join(x.choices[0].delta.content or "" for x in stream if x.choices) == expected.text
    finally:
        pair.close()

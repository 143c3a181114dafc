"""``proxyalign serve`` with tools and output formats, driven by the real ``openai`` client.

A real uvicorn server on a loopback port, over tiny random models that use the real pair's tokenizer
and chat template (Hermes ``<tool_call>`` blocks), so grammars, templates and the tool-call parser are
the real ones. Random models never call a tool by themselves, so calls come from a forced
``tool_choice``; every answer is also checked against the same request decoded by the aligner alone.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from proxyalign.engine.results import FinishReason, Generation, GenerationChunk
from proxyalign.server import ServerConfig, create_app
from proxyalign.server.service import assistant_message, finish_reason, provenance_of, tool_call_pieces
from proxyalign.testing import real_pair_dirs, tiny_chat_aligner
from proxyalign.tools import get_tool_parser
from tests.test_server import KEY, MODEL, LiveServer, metric

#: One small tool: the tiny models' context window is 256 tokens, and Qwen's tool prompt takes ~150.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
#: A short system turn replaces Qwen's default one, to save context.
MESSAGES = [{"role": "system", "content": "x"}, {"role": "user", "content": "Weather?"}]
ANSWER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "ok", "n"],
    "additionalProperties": False,
}


def fits(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` is valid for ``schema``: jsonschema when installed, else the keywords the
    schemas above use."""
    try:
        import jsonschema
    except ImportError:
        return _fits(value, schema)
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        extra = set(value) - set(properties) if isinstance(value, dict) else set()
        return (
            isinstance(value, dict)
            and set(schema.get("required", [])) <= set(value)
            and not (extra and schema.get("additionalProperties") is False)
            and all(_fits(value[k], s) for k, s in properties.items() if k in value)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        low, high = schema.get("minimum", value), schema.get("maximum", value)
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return isinstance(value, bool) if kind == "boolean" else kind is None


@pytest.fixture(scope="module")
def pa():
    aligner = tiny_chat_aligner("dual_kad")
    if aligner is None:
        pytest.skip("the real pair's tokenizer is not fetched (make fetch)")
    yield aligner
    aligner.close()


@pytest.fixture(scope="module")
def live(pa):
    with LiveServer(create_app(pa, ServerConfig(api_key=KEY, max_tokens=64))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(live):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live.url, headers=headers, timeout=120) as c:
        yield c


def ask(client: openai.OpenAI, **kwargs: Any) -> Any:
    """A chat request on :data:`MESSAGES` (64 tokens unless ``max_tokens`` says otherwise)."""
    kwargs.setdefault("max_tokens", 64)
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)


@pytest.mark.parametrize(
    "choice", ["get_weather", {"type": "function", "function": {"name": "get_weather"}}, "required"]
)
def test_a_forced_tool_choice_answers_a_call_that_fits_the_schema(client, pa, choice):
    options = {"tools": [WEATHER], "tool_choice": choice, "temperature": 0, "seed": 4}
    reply = ask(client, **options)
    expected = pa.generate([MESSAGES], max_new_tokens=64, **options)[0]
    (answer,) = reply.choices
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    assert [c.model_dump() for c in answer.message.tool_calls] == [c.to_openai() for c in expected.tool_calls]
    call = answer.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert fits(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_calls_reassemble_into_the_answered_call(client, http):
    options = {"tools": [WEATHER], "tool_choice": "get_weather", "seed": 9}
    whole = ask(client, **options).choices[0].message.tool_calls
    before = metric(http.get("/metrics").text, "proxyalign_tool_calls_total")
    chunks = list(ask(client, stream=True, **options))
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks[1:]:
        delta = chunk.choices[0].delta
        assert not delta.content, "a forced call leaves no text"
        for piece in delta.tool_calls or []:
            if piece.index not in calls:
                assert piece.id and piece.type == "function" and piece.function.name, "first piece names it"
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.function.arguments or ""
    assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == [
        (c.id, c.function.name, c.function.arguments) for c in whole
    ]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert metric(http.get("/metrics").text, "proxyalign_tool_calls_total") == before + len(whole)


def test_parallel_tool_calls_false_answers_the_first_call_only(client):
    options = {"tools": [WEATHER], "tool_choice": "required", "temperature": 0, "seed": 4}
    free = ask(client, **options).choices[0].message.tool_calls
    single = ask(client, parallel_tool_calls=False, **options).choices[0]
    assert single.finish_reason == "tool_calls"
    assert [c.model_dump() for c in single.message.tool_calls] == [c.model_dump() for c in free[:1]]


def test_shaping_two_calls_a_truncated_answer_and_a_malformed_block():
    """The tiny models never write two calls (they end after one), so the cut is checked on a real
    two-call output, parsed and streamed by the real Hermes parser, through the server's own shaping."""
    text = "\n".join(
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>' for c in "PR"
    )
    parser = get_tool_parser("hermes")
    parsed = parser.parse(text, tools=["get_weather"], seed=0)
    assert len(parsed.tool_calls) == 2
    done = Generation(text, [], [], FinishReason.EOS, content=parsed.content, tool_calls=parsed.tool_calls)
    message = assistant_message(done, single_tool_call=True)
    assert message.content is None and [c.id for c in message.tool_calls] == [parsed.tool_calls[0].id]
    assert finish_reason(done.finish_reason, done) == "tool_calls"
    cut = Generation(text, [], [], FinishReason.LENGTH, content=parsed.content, tool_calls=parsed.tool_calls)
    assert finish_reason(cut.finish_reason, cut) == "length", "a truncated answer says so, calls or not"
    stream = parser.stream(tools=["get_weather"], seed=0)
    deltas = [*stream.feed(text).tool_calls, *stream.finish().tool_calls]
    chunk = GenerationChunk(0, text, [], [], FinishReason.EOS, done, content="", tool_calls=deltas)
    assert [p.index for p in tool_call_pieces(chunk, single_tool_call=True)] == [0]
    assert [p.index for p in tool_call_pieces(chunk)] == [0, 1]
    bad = parser.parse("<tool_call>\nnot json\n</tool_call>", tools=["get_weather"])
    broken = Generation(
        bad.content, [], [], FinishReason.EOS, content=bad.content, tool_call_errors=bad.errors
    )
    assert provenance_of(broken, "dual_kad").tool_call_errors == [bad.errors[0].message]
    assert "tool_call_errors" not in provenance_of(done, "dual_kad").model_dump()


def test_tools_with_auto_choice_answer_text_when_no_call_is_made(client, pa):
    reply = ask(client, tools=[WEATHER], temperature=0, max_tokens=12)
    expected = pa.generate([MESSAGES], tools=[WEATHER], temperature=0, max_new_tokens=12)[0]
    (answer,) = reply.choices
    assert not expected.tool_calls, "a random model does not call tools by itself"
    assert answer.message.content == expected.content and answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length")


def test_a_conversation_with_a_tool_result_is_answered(client, pa):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "P"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=8
    )
    core = [*messages[:-1], {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    expected = pa.generate([core], tools=[WEATHER], temperature=0, max_new_tokens=8)[0]
    assert reply.choices[0].message.content == expected.content
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens


def test_response_format_json_schema_answers_valid_json(client):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": ANSWER, "strict": True},
    }
    for stream in (False, True):
        if stream:
            pieces = ask(client, response_format=response_format, temperature=0, stream=True)
            content = "".join(c.choices[0].delta.content or "" for c in pieces)
        else:
            reply = ask(client, response_format=response_format, temperature=0).choices[0]
            assert reply.finish_reason == "stop"
            content = reply.message.content
        assert fits(json.loads(content), ANSWER), content


def test_response_format_json_object_and_regex(client, http):
    replies = ask(client, response_format={"type": "json_object"}, seed=1, n=4, max_tokens=40).choices
    finished = [r for r in replies if r.finish_reason == "stop"]
    assert finished, "an object closes within 40 tokens in some choice"
    assert all(isinstance(json.loads(r.message.content), dict) for r in finished)
    regex = {"type": "regex", "pattern": "[ab]{3}x"}
    reply = ask(client, response_format=regex, seed=2).choices[0]
    assert re.fullmatch("[ab]{3}x", reply.message.content)
    done = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Pick:", "max_tokens": 10, "seed": 2, "response_format": regex},
    )
    assert done.status_code == 200 and re.fullmatch("[ab]{3}x", done.json()["choices"][0]["text"])


GOOD = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
TOOLS = {**GOOD, "tools": [WEATHER]}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}
BAD = [
    # (name, body, status, param, text the message must contain)
    ("unknown format type", {**GOOD, "response_format": {"type": "xml"}}, 400, "response_format", "xml"),
    (
        "json_schema without a schema",
        {**GOOD, "response_format": {"type": "json_schema"}},
        400,
        "response_format",
        "json_schema",
    ),
    (
        "regex that does not compile",
        {**GOOD, "response_format": {"type": "regex", "pattern": "(a"}},
        400,
        "response_format",
        "regex",
    ),
    (
        "format that is not an object",
        {**GOOD, "response_format": "json"},
        422,
        "response_format",
        "response_format",
    ),
    ("unknown tool name", {**TOOLS, "tool_choice": "get_time"}, 400, "tool_choice", "get_time"),
    (
        "unknown tool as a function",
        {**TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        400,
        "tool_choice",
        "'f'",
    ),
    ("forced choice without tools", {**GOOD, "tool_choice": "required"}, 400, "tool_choice", "tools"),
    ("tool without a function", {**GOOD, "tools": [{"type": "function"}]}, 400, "tools", "tools[0]"),
    (
        "calls on a user message",
        {**TOOLS, "messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
        400,
        "messages[0].tool_calls",
        "assistant",
    ),
    (
        "arguments that are not JSON",
        {**TOOLS, "messages": [*MESSAGES, {"role": "assistant", "tool_calls": [CALL]}]},
        400,
        "messages",
        "arguments",
    ),
    (
        "a function message",
        {**GOOD, "messages": [{"role": "function", "name": "f", "content": "1"}]},
        400,
        "messages[0].role",
        "tool messages",
    ),
    ("deprecated functions", {**GOOD, "functions": [{"name": "f"}]}, 400, "functions", "tools"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_tools_and_formats_are_refused_naming_the_parameter(http, name, body, status, param, text):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_tools_on_completions_point_to_chat(http):
    body = {"model": MODEL, "prompt": "x", "tools": [WEATHER]}
    error = http.post("/v1/completions", json=body).json()["error"]
    assert error["param"] == "tools" and "/v1/chat/completions" in error["message"]


def test_the_openai_client_raises_on_an_unknown_tool(client):
    with pytest.raises(openai.BadRequestError, match="get_time"):
        ask(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}})


def test_langchain_bind_tools_and_structured_output(live):
    """LangChain's ChatOpenAI sends tools, tool_choice and response_format in its own shapes."""
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{live.url}/v1", api_key=KEY, temperature=0, max_tokens=64, max_retries=0
    )
    messages = [("system", "x"), ("human", "Weather?")]
    forced = llm.bind_tools([WEATHER], tool_choice="get_weather", parallel_tool_calls=False)
    (call,) = forced.invoke(messages).tool_calls
    assert call["name"] == "get_weather" and fits(call["args"], WEATHER["function"]["parameters"])
    streamed = list(forced.stream(messages))
    merged = streamed[0]
    for chunk in streamed[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]
    structured = llm.with_structured_output({"title": "answer", **ANSWER}, method="json_schema")
    assert fits(structured.invoke(messages), ANSWER)


@pytest.mark.real_weights
def test_real_pair_calls_a_tool_by_itself():
    """With tool_choice "auto" the real pair (whose q* knows Qwen's tool prompt) calls the tool:
    non-streamed and streamed, in OpenAI's shapes."""
    import proxyalign

    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        pytest.skip("real pair not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
    pair = proxyalign.ProxyAligner.from_pretrained(
        str(dirs[0]), str(dirs[1]), dtype="bfloat16", device="cpu", criterion="confidence_bet"
    )
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    description = "Get the current weather in a city."
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "description": description, "parameters": parameters},
    }
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    options = {"model": MODEL, "messages": messages, "tools": [tool], "temperature": 0, "max_tokens": 40}
    try:
        live = LiveServer(create_app(pair, ServerConfig()))
        with live, openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=600) as c:
            (answer,) = c.chat.completions.create(**options).choices
            assert answer.finish_reason == "tool_calls" and answer.message.content is None
            (call,) = answer.message.tool_calls
            arguments = json.loads(call.function.arguments)
            assert call.function.name == "get_weather" and arguments == {"city": "Paris"}
            pieces = [x.choices[0] for x in c.chat.completions.create(**options, stream=True) if x.choices]
            streamed = [p for x in pieces for p in x.delta.tool_calls or []]
            assert [(p.function.name, p.function.arguments) for p in streamed] == [
                ("get_weather", call.function.arguments)
            ]
            assert pieces[-1].finish_reason == "tool_calls"
    finally:
        pair.close()

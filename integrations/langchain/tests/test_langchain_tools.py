"""ChatProxyAlign's tool calling, structured output, time limits and OpenAI-style call arguments.

Tool and format tests run tiny random models over the real pair's tokenizer and chat template (see
conftest.tiny_chat_pair): what they write is noise, so the tests check what the grammar guarantees (a
forced call is a well-formed call to the right tool; a schema's output parses) and the plumbing between
LangChain and the engine, not what a model would answer. Tools without arguments, and booleans or
enums in schemas, keep the noise short: a random model closes them at once, while its free text and
numbers may run to max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from proxyalign import InvalidParameterError, ProxyAligner
from proxyalign.tools import render_chat
from pydantic import BaseModel, Field, SecretStr
from typing_extensions import TypedDict

from langchain_proxyalign import ChatProxyAlign
from langchain_proxyalign.chat_models import to_engine_messages


@tool
def magic() -> int:
    """Calculate the magic number."""
    return 5


@tool
def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny"


class Verdict(BaseModel):
    """Whether a claim holds, and of which kind it is."""

    holds: bool = Field(description="whether the claim holds")
    kind: Literal["fact", "opinion"]


class VerdictDict(TypedDict):
    """Whether a claim holds."""

    holds: bool


def make(aligner: ProxyAligner, **kwargs: Any) -> ChatProxyAlign:
    return ChatProxyAlign(aligner=aligner, **{"max_tokens": 24, "temperature": 0, "seed": 0, **kwargs})


def merged(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    return full


# -- bind_tools ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tools", "choice"),
    [
        ([magic], "any"),
        ([magic], "required"),
        ([magic], True),
        ([get_weather, magic], "magic"),
        ([get_weather, magic], {"type": "function", "function": {"name": "magic"}}),
    ],
    ids=["any", "required", "True", "name", "dict"],
)
def test_forced_tool_choice_calls_the_tool(tiny_chat: ProxyAligner, tools: list, choice: Any) -> None:
    reply = make(tiny_chat).bind_tools(tools, tool_choice=choice).invoke("What is the magic number?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("magic", {})]
    assert reply.tool_calls[0]["id"].startswith("call_") and reply.content == ""
    assert not reply.invalid_tool_calls


@pytest.mark.parametrize("choice", [None, "auto", False, "none"])
def test_unforced_tool_choice_offers_the_tools(tiny_chat: ProxyAligner, choice: Any) -> None:
    """The tools are in the prompt (the chat template's tool section) unless the choice is "none"."""
    chat = make(tiny_chat, max_tokens=4)
    question = [HumanMessage("What is the weather in Paris?")]
    reply = chat.bind_tools([get_weather], tool_choice=choice).invoke(question)
    offered = chat.get_num_tokens_from_messages(question, tools=[get_weather])
    plain = chat.get_num_tokens_from_messages(question)
    assert offered > plain + 20
    assert reply.usage_metadata["input_tokens"] == (plain if choice == "none" else offered)
    if choice == "none":
        assert not reply.tool_calls


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([magic], "get_weather", "bound tools: magic"),
        ([magic, get_weather], True, "tool_choice=True means the single bound tool, but 2"),
        ([magic], 3, "tool_choice must be one of"),
        ([magic], {"type": "function", "function": {"name": "nope"}}, "got {'type'"),
    ],
)
def test_bad_tool_choice_is_refused_at_bind_time(
    tiny_chat: ProxyAligner, tools: list, choice: Any, message: str
) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        make(tiny_chat).bind_tools(tools, tool_choice=choice)


def test_parallel_tool_calls_false_only_with_one_named_tool(tiny_chat: ProxyAligner) -> None:
    chat = make(tiny_chat)
    with pytest.raises(InvalidParameterError, match="parallel_tool_calls=False"):
        chat.bind_tools([magic], tool_choice="any", parallel_tool_calls=False)
    with pytest.raises(InvalidParameterError, match="parallel_tool_calls=False"):
        chat.bind_tools([magic]).invoke("hi", parallel_tool_calls=False)
    reply = chat.bind_tools([magic], tool_choice="magic", parallel_tool_calls=False).invoke("hi")
    assert len(reply.tool_calls) == 1


def test_bad_tools_are_refused_at_bind_time(tiny_chat: ProxyAligner) -> None:
    with pytest.raises(InvalidParameterError, match="tools"):
        make(tiny_chat).bind_tools([{"type": "function", "function": {"name": ""}}])


def test_streamed_tool_call_chunks_reassemble(tiny_chat: ProxyAligner) -> None:
    """Chunks carry tool_call_chunks that add up to the same calls invoke() returns (ids included: the
    seed makes them reproducible)."""
    bound = make(tiny_chat).bind_tools([get_weather, magic], tool_choice="magic")
    reply = bound.invoke("What is the magic number?")
    chunks = list(bound.stream("What is the magic number?"))
    pieces = [c for c in chunks if c.tool_call_chunks]
    assert pieces and pieces[0].tool_call_chunks[0]["index"] == 0
    assert pieces[0].tool_call_chunks[0]["name"] == "magic"
    full = merged(chunks)
    assert full.chunk_position == "last"
    assert full.tool_calls == reply.tool_calls and full.content == reply.content
    assert full.usage_metadata == reply.usage_metadata


async def test_async_tool_calls_match_sync(tiny_chat: ProxyAligner) -> None:
    bound = make(tiny_chat).bind_tools([magic], tool_choice="any")
    reply = bound.invoke("What is the magic number?")
    assert (await bound.ainvoke("What is the magic number?")).tool_calls == reply.tool_calls
    chunks = [c async for c in bound.astream("What is the magic number?")]
    assert merged(chunks).tool_calls == reply.tool_calls


def test_tool_message_history_round_trip(tiny_chat: ProxyAligner, count_calls: Any) -> None:
    """A tool-call turn and its result reach the engine as OpenAI messages, and the template renders
    them: an AIMessage's calls (from list content with tool_use blocks too) and the ToolMessage."""
    chat = make(tiny_chat, max_tokens=4)
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    history = [
        SystemMessage("Be brief."),
        HumanMessage("Weather in Paris?"),
        AIMessage(
            [{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "call_1", "name": "x"}],
            tool_calls=[call],
        ),
        ToolMessage([{"type": "text", "text": "sunny"}], tool_call_id="call_1"),
    ]
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert to_engine_messages(history) == expected
    calls = count_calls(tiny_chat, "generate")
    reply = chat.bind_tools([get_weather]).invoke(history)
    assert calls == [[expected]]
    assert reply.usage_metadata["input_tokens"] == chat.get_num_tokens_from_messages(history, [get_weather])
    rendered = render_chat(tiny_chat.tokenizer, expected, [convert_to_openai_tool(get_weather)])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered
    empty = AIMessage("", tool_calls=[call])
    assert to_engine_messages([empty])[0]["content"] is None


# -- with_structured_output ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_parses(tiny_chat: ProxyAligner, method: str) -> None:
    structured = make(tiny_chat, max_tokens=40).with_structured_output(Verdict, method=method)
    assert isinstance(structured.invoke("Is the sky blue?"), Verdict)
    raw = make(tiny_chat, max_tokens=40).with_structured_output(Verdict, method=method, include_raw=True)
    out = raw.invoke("Is the sky blue?")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["parsed"], Verdict) and out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage)
    if method == "function_calling":
        assert out["raw"].tool_calls[0]["name"] == "Verdict"
    else:
        assert Verdict.model_validate_json(out["raw"].content) == out["parsed"]


def test_json_mode_gives_a_json_object(tiny_chat: ProxyAligner) -> None:
    """json_mode constrains the output to a JSON object, not to the schema's keys: a random model's
    object rarely validates, and include_raw reports that as a parsing error."""
    structured = make(tiny_chat, max_tokens=40).with_structured_output(
        Verdict, method="json_mode", include_raw=True
    )
    out = structured.invoke("Is the sky blue? Answer in JSON with keys holds and kind.")
    assert isinstance(json.loads(out["raw"].content), dict)
    assert isinstance(out["parsed"], Verdict) or isinstance(out["parsing_error"], OutputParserException)
    assert (out["parsed"] is None) == (out["parsing_error"] is not None)


@pytest.mark.parametrize(
    "schema", [VerdictDict, Verdict.model_json_schema()], ids=["typeddict", "json_schema"]
)
def test_structured_output_dict_schemas_give_dicts(tiny_chat: ProxyAligner, schema: Any) -> None:
    for method in ("json_schema", "function_calling"):
        result = make(tiny_chat, max_tokens=40).with_structured_output(schema, method=method).invoke("Hi")
        assert isinstance(result, dict) and isinstance(result["holds"], bool)


def test_structured_output_streams(tiny_chat: ProxyAligner) -> None:
    structured = make(tiny_chat, max_tokens=40).with_structured_output(Verdict)
    parts = list(structured.stream("Is the sky blue?"))
    assert parts and parts[-1] == structured.invoke("Is the sky blue?")


def test_response_format_per_call(tiny_chat: ProxyAligner) -> None:
    """Chains written for OpenAI pass response_format themselves: a class, or OpenAI's dict."""
    chat = make(tiny_chat, max_tokens=40)
    Verdict.model_validate_json(chat.invoke("Is the sky blue?", response_format=Verdict).content)
    regex = {"type": "regex", "pattern": "(yes|no)"}
    assert chat.invoke("Is the sky blue?", response_format=regex).content in {"yes", "no"}
    with pytest.raises(InvalidParameterError, match="response_format"):
        chat.invoke("Hi", response_format={"type": "xml"})


def test_structured_output_bad_arguments(tiny_chat: ProxyAligner) -> None:
    chat = make(tiny_chat)
    with pytest.raises(InvalidParameterError, match="method must be one of"):
        chat.with_structured_output(Verdict, method="xml")
    with pytest.raises(InvalidParameterError, match="needs a schema"):
        chat.with_structured_output(None)
    with pytest.raises(InvalidParameterError, match="unknown argument"):
        chat.with_structured_output(Verdict, tools=[])


# -- timeout ------------------------------------------------------------------------------------------
def running(aligner: ProxyAligner) -> int:
    """Rows still decoding once aborts have landed (an abort takes effect within one step)."""
    for _ in range(100):
        if not aligner.status()["running"]:
            return 0
        time.sleep(0.01)
    return aligner.status()["running"]


def test_timeout_aborts_sync_calls(tiny: ProxyAligner) -> None:
    chat = make(tiny, max_tokens=240, timeout=0.05)
    with pytest.raises(TimeoutError, match=r"timeout=0.05 s and was aborted"):
        chat.invoke("w5 w6")
    assert running(tiny) == 0
    with pytest.raises(TimeoutError, match="aborted"):
        list(chat.stream("w5 w6"))
    assert running(tiny) == 0
    with pytest.raises(TimeoutError, match=r"timeout=0\.01"):
        make(tiny, max_tokens=240).invoke("w5 w6", timeout=0.01)  # per call
    reply = make(tiny, max_tokens=4, timeout=30).invoke("w5 w6")  # within the limit: as without one
    assert reply.content == make(tiny, max_tokens=4).invoke("w5 w6").content


async def test_timeout_aborts_async_calls(tiny: ProxyAligner) -> None:
    chat = make(tiny, max_tokens=240, timeout=0.05)
    with pytest.raises(TimeoutError, match="aborted"):
        await chat.ainvoke("w5 w6")
    with pytest.raises(TimeoutError, match="aborted"):
        _ = [c async for c in chat.astream("w5 w6")]
    await asyncio.sleep(0)
    assert running(tiny) == 0
    chunks = [c async for c in make(tiny, max_tokens=4, timeout=30).astream("w5 w6")]
    assert merged(chunks).content == make(tiny, max_tokens=4).invoke("w5 w6").content


def test_bad_timeout_values(tiny: ProxyAligner) -> None:
    with pytest.raises(ValueError, match="timeout"):
        make(tiny, timeout=0)
    with pytest.raises(InvalidParameterError, match="timeout must be a positive number"):
        make(tiny).invoke("w5", timeout=-1)


def test_remote_only_settings_are_accepted(tiny: ProxyAligner) -> None:
    """Code written for remote models passes these; a local model has no key and nothing to retry."""
    chat = make(tiny, timeout=60, max_retries=2, api_key="secret")
    assert isinstance(chat.api_key, SecretStr) and "secret" not in repr(chat)
    assert chat.invoke("w5").content == make(tiny).invoke("w5").content


# -- OpenAI-style call arguments ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 1),
        ("logit_bias", {"5": 10}),
        ("user", "someone"),
        ("functions", [{"name": "f"}]),
    ],
)
def test_unsupported_openai_arguments_fail_clearly(tiny: ProxyAligner, name: str, value: Any) -> None:
    with pytest.raises(InvalidParameterError, match=rf"ChatProxyAlign does not support {name}="):
        make(tiny).invoke("w5", **{name: value})


def test_neutral_openai_arguments_pass(tiny: ProxyAligner) -> None:
    expected = make(tiny, max_tokens=4).invoke("w5 w6").content
    neutral = {
        "n": 1,
        "logprobs": False,
        "presence_penalty": 0.0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "parallel_tool_calls": True,
        "stream_options": {"include_usage": True},
    }
    assert make(tiny).invoke("w5 w6", max_completion_tokens=4, **neutral).content == expected
    with pytest.raises(InvalidParameterError, match="same setting"):
        make(tiny).invoke("w5", max_tokens=4, max_completion_tokens=4)
    with pytest.raises(TypeError, match="unknown argument 'temprature'"):  # a typo is no OpenAI argument
        make(tiny).invoke("w5", temprature=0.5)

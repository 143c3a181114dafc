"""ProxyAlign as a FunctionCallingLLM: tool calls, tool turns, structured output and a FunctionAgent.

Tiny random models over the real pair's tokenizer and chat template: they never call a tool on their
own, so calls here are forced (``tool_required``, ``tool_choice``), and every call and object they
produce is valid only because the engine decodes under a grammar.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.core.types import PydanticProgramMode
from proxyalign import InvalidParameterError, ProxyAligner
from proxyalign.testing import tiny_chat_aligner
from pydantic import BaseModel, Field

from llama_index.llms.proxyalign import ProxyAlign
from llama_index.llms.proxyalign.base import to_engine_messages

QUESTION = "What is 3 times 4?"


class Pair(BaseModel):
    """Two small numbers."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


def multiply(a: int, b: int) -> int:
    """Multiply two numbers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


# Bounded arguments: a random model writes digits for as long as the grammar lets it.
MULTIPLY = FunctionTool.from_defaults(multiply, fn_schema=Pair)
ADD = FunctionTool.from_defaults(add, fn_schema=Pair)


def make(aligner: ProxyAligner, **kwargs: Any) -> ProxyAlign:
    return ProxyAlign(aligner=aligner, **{"max_new_tokens": 40, "temperature": 0, "seed": 0, **kwargs})


def test_is_a_function_calling_llm(tiny_tools: ProxyAligner) -> None:
    llm = make(tiny_tools)
    assert isinstance(llm, FunctionCallingLLM)
    assert llm.metadata.is_function_calling_model and llm.metadata.is_chat_model


def test_forced_tool_call_is_parseable(tiny_tools: ProxyAligner) -> None:
    llm = make(tiny_tools)
    response = llm.chat_with_tools([MULTIPLY], QUESTION, tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "multiply" and selection.tool_id.startswith("call_")
    Pair.model_validate(selection.tool_kwargs)
    # Kept as LlamaIndex's OpenAI LLM keeps calls: blocks, and OpenAI dicts in additional_kwargs.
    (block,) = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    (call,) = response.message.additional_kwargs["tool_calls"]
    assert block.tool_kwargs == json.loads(call["function"]["arguments"]) == selection.tool_kwargs
    assert call == {"id": selection.tool_id, "type": "function", "function": call["function"]}
    assert response.raw["tool_calls"] == [call] and response.raw["tool_call_errors"] == []
    assert response.message.content is None  # nothing but the call, as in OpenAI's replies


def test_tool_choice_names_one_of_several_tools(tiny_tools: ProxyAligner) -> None:
    llm = make(tiny_tools)
    for choice in ("add", {"type": "function", "function": {"name": "add"}}):
        response = llm.chat_with_tools([MULTIPLY, ADD], QUESTION, tool_choice=choice)
        assert [c.tool_name for c in llm.get_tool_calls_from_response(response)] == ["add"]
    with pytest.raises(InvalidParameterError, match="divide"):
        llm.chat_with_tools([MULTIPLY, ADD], QUESTION, tool_choice="divide")


def test_no_call_follows_error_on_no_tool_call(tiny_tools: ProxyAligner) -> None:
    llm = make(tiny_tools, max_new_tokens=6)
    response = llm.chat_with_tools([MULTIPLY], QUESTION)  # "auto": a random model answers in text
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="0 tool calls"):
        llm.get_tool_calls_from_response(response)
    cut = llm.chat_with_tools([MULTIPLY], QUESTION, tool_required=True)  # 6 tokens: the call is cut short
    assert cut.raw["tool_call_errors"] and cut.raw["tool_calls"] == []
    with pytest.raises(ValueError, match=r"malformed call blocks: .*no closing </tool_call>"):
        llm.get_tool_calls_from_response(cut)


async def test_streamed_calls_reassemble(tiny_tools: ProxyAligner) -> None:
    llm = make(tiny_tools)
    whole = llm.chat_with_tools([MULTIPLY], QUESTION, tool_required=True)
    astream = await llm.astream_chat_with_tools([MULTIPLY], QUESTION, tool_required=True)
    streams = {
        "sync": list(llm.stream_chat_with_tools([MULTIPLY], QUESTION, tool_required=True)),
        "async": [r async for r in astream],
    }
    for responses in streams.values():
        final = responses[-1]
        assert final.message.model_dump() == whole.message.model_dump()  # seeded: the same call ids
        assert "".join(r.delta for r in responses) == ""  # no text outside the call
        assert final.raw["usage"] == whole.raw["usage"]
        partial = [llm.get_tool_calls_from_response(r, error_on_no_tool_call=False) for r in responses]
        assert partial[-1] == llm.get_tool_calls_from_response(whole)


def test_tool_turns_reach_the_engine_as_openai_messages(tiny_tools: ProxyAligner, count_calls: Any) -> None:
    llm = make(tiny_tools)
    reply = llm.chat_with_tools([MULTIPLY], QUESTION, tool_required=True).message
    (call,) = reply.additional_kwargs["tool_calls"]
    result = ChatMessage(role=MessageRole.TOOL, content="12", additional_kwargs={"tool_call_id": call["id"]})
    history = [ChatMessage(role=MessageRole.USER, content=QUESTION), reply, result]
    expected = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "12", "tool_call_id": call["id"]},
    ]
    assert to_engine_messages(history) == expected
    # A history written by another LLM: calls only in additional_kwargs, no blocks.
    foreign = ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [call]})
    assert to_engine_messages([foreign]) == [expected[1]]
    prompts = count_calls(tiny_tools, "generate")
    llm.chat_with_tools([MULTIPLY], chat_history=history, max_new_tokens=4)
    assert prompts == [[expected]]


def test_plain_text_base_model_gets_the_tools_too(count_calls: Any) -> None:
    """The papers' setting (a plain-text p): with tools the engine gets the messages and writes the
    tools and calls into each model's prompt its own way, instead of ``messages_to_prompt``."""
    aligner = tiny_chat_aligner(prompt_formats={"base": "plain"})
    if aligner is None:
        pytest.skip("real offline pair not fetched")
    for model in aligner.models.values():
        model.config.max_position_embeddings = 4096
    llm = make(aligner)
    prompts = count_calls(aligner, "generate")
    response = llm.chat_with_tools([MULTIPLY], QUESTION, tool_required=True)
    assert prompts == [[[{"role": "user", "content": QUESTION}]]]
    (selection,) = llm.get_tool_calls_from_response(response)
    Pair.model_validate(selection.tool_kwargs)


def test_legacy_function_messages_are_refused(tiny_tools: ProxyAligner) -> None:
    with pytest.raises(NotImplementedError, match="'function' message"):
        make(tiny_tools).chat([ChatMessage(role=MessageRole.FUNCTION, content="12")])


async def test_structured_predict_decodes_under_the_schema(tiny_tools: ProxyAligner) -> None:
    llm = make(tiny_tools)
    prompt = PromptTemplate("Invent a person called {name}.")
    assert isinstance(llm.structured_predict(Person, prompt, name="Ann"), Person)
    assert isinstance(await llm.astructured_predict(Person, prompt, name="Ann"), Person)
    assert prompt.output_parser is None  # the caller's template is left as it was
    partials = list(llm.stream_structured_predict(Person, prompt, name="Ann"))
    assert isinstance(partials[-1], Person)
    apartials = [p async for p in await llm.astream_structured_predict(Person, prompt, name="Ann")]
    assert apartials[-1] == partials[-1]
    # The other program modes run LlamaIndex's programs; FUNCTION forces a call, under a grammar too.
    forced = llm.model_copy(update={"pydantic_program_mode": PydanticProgramMode.FUNCTION})
    assert isinstance(forced.structured_predict(Person, prompt, name="Ann"), Person)


async def test_as_structured_llm(tiny_tools: ProxyAligner) -> None:
    structured = make(tiny_tools).as_structured_llm(Person)
    messages = [ChatMessage(role=MessageRole.USER, content="Invent a person.")]
    response = structured.chat(messages)
    assert isinstance(response.raw, Person)
    assert Person.model_validate_json(response.message.content) == response.raw
    assert isinstance((await structured.achat(messages)).raw, Person)
    template = ChatPromptTemplate(message_templates=messages)
    assert isinstance(make(tiny_tools).structured_predict(Person, template), Person)


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_calls_the_forced_tool_and_answers(
    tiny_tools: ProxyAligner, streaming: bool
) -> None:
    agent = FunctionAgent(
        tools=[MULTIPLY],
        llm=make(tiny_tools, max_new_tokens=32),
        initial_tool_choice="multiply",
        streaming=streaming,
    )
    handler = agent.run(QUESTION)
    events = [event async for event in handler.stream_events()]
    output = await handler
    (result,) = [e for e in events if isinstance(e, ToolCallResult)]
    assert result.tool_name == "multiply" and not result.tool_output.is_error
    assert result.tool_output.raw_output == result.tool_kwargs["a"] * result.tool_kwargs["b"]
    assert isinstance(output, AgentOutput) and output.tool_calls == [result]
    assert output.response.role == MessageRole.ASSISTANT

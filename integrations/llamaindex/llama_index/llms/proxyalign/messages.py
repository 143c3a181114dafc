"""LlamaIndex chat messages <-> the engine's OpenAI-shaped messages, tool calls and tool results included.

An assistant's calls are kept twice, the way LlamaIndex's own OpenAI LLM keeps them: as ``ToolCallBlock``
blocks (what ``FunctionAgent`` and newer integrations read) and as OpenAI ``tool_calls`` dicts in
``additional_kwargs`` (what older code reads). Reading a history accepts either, so a conversation held
by another LLM (e.g. OpenAI's, whose ``tool_calls`` are SDK objects) can continue here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json

from proxyalign.tools import ToolCall

__all__ = ["assistant_message", "has_tool_turns", "message_tool_calls", "single_call", "to_engine_messages"]

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
}
#: Blocks any message may hold: text, and what carries nothing for the model (another model's reasoning,
#: which chat templates drop, and provider cache hints).
_PLAIN_BLOCKS = (TextBlock, ThinkingBlock, CachePoint)


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages -> the engine's chat prompt: ``{"role", "content"}``, plus ``tool_calls`` on an
    assistant turn that called tools and ``tool_call_id`` on a tool result."""
    return [_engine_message(message, number) for number, message in enumerate(messages)]


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an engine chat holds tool calls or results (the engine must then render the messages)."""
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def _engine_message(message: ChatMessage, number: int) -> dict[str, Any]:
    role = _ROLES.get(message.role)
    if role is None:
        raise NotImplementedError(
            f"ProxyAlign cannot send a {message.role.value!r} message (message {number}): use "
            "MessageRole.TOOL with additional_kwargs={'tool_call_id': ...} for tool results"
        )
    _check_blocks(message, role, number)
    out: dict[str, Any] = {"role": role, "content": message.content or ""}
    if role == "assistant" and (calls := _history_calls(message)):
        out["content"] = out["content"] or None  # OpenAI's shape of a turn that only called tools
        out["tool_calls"] = calls
    if role == "tool" and (call_id := _tool_call_id(message)) is not None:
        out["tool_call_id"] = call_id
    return out


def _check_blocks(message: ChatMessage, role: str, number: int) -> None:
    for block in message.blocks:
        if isinstance(block, _PLAIN_BLOCKS) or (role == "assistant" and isinstance(block, ToolCallBlock)):
            continue
        raise NotImplementedError(
            f"ProxyAlign handles text only: the hybrid decoder has no image, audio or document inputs "
            f"(message {number}, a {role} message, has a {type(block).__name__})"
        )


def _tool_call_id(message: ChatMessage) -> str | None:
    """The call a tool result answers (FunctionAgent: ``tool_call_id``; OpenAI Responses: ``call_id``)."""
    kwargs = message.additional_kwargs
    return kwargs.get("tool_call_id", kwargs.get("call_id"))


def _history_calls(message: ChatMessage) -> list[dict[str, Any]]:
    """An assistant turn's calls as OpenAI dicts, from its blocks or else its ``additional_kwargs``."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        return [_openai_call(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in blocks]
    return [_openai_dict(call) for call in message.additional_kwargs.get("tool_calls") or ()]


def _openai_call(call_id: str | None, name: str, arguments: Mapping[str, Any] | str) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": text}}
    return {"id": call_id, **call} if call_id else call


def _openai_dict(call: Any) -> dict[str, Any]:
    """One ``additional_kwargs["tool_calls"]`` entry (a dict, or an SDK object with ``model_dump``)."""
    data = call.model_dump() if hasattr(call, "model_dump") else call
    if not isinstance(data, Mapping) or not isinstance(data.get("function"), Mapping):
        raise ValueError(
            'ProxyAlign reads additional_kwargs["tool_calls"] entries shaped as OpenAI tool calls '
            f'({{"id", "type": "function", "function": {{"name", "arguments"}}}}); got {call!r}'
        )
    function = data["function"]
    return _openai_call(data.get("id"), function.get("name"), function.get("arguments") or {})


def assistant_message(content: str, calls: Sequence[ToolCall]) -> ChatMessage:
    """A reply: its text (none when it only called tools, as OpenAI's replies) and its calls."""
    blocks: list[Any] = [TextBlock(text=content)] if content or not calls else []
    blocks += [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.parsed_arguments) for c in calls
    ]
    extra = {"tool_calls": [c.to_openai() for c in calls]} if calls else {}
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def message_tool_calls(message: ChatMessage) -> list[ToolSelection]:
    """The calls in a reply as LlamaIndex's ``ToolSelection`` (arguments that are not a JSON object,
    e.g. a stream's unfinished call, give ``{}``)."""
    return [
        ToolSelection(
            tool_id=call.get("id") or "",
            tool_name=call["function"]["name"],
            tool_kwargs=_arguments(call["function"]["arguments"]),
        )
        for call in _history_calls(message)
    ]


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = parse_partial_json(text)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def single_call(message: ChatMessage) -> ChatMessage:
    """The reply with its first call only (what ``allow_parallel_tool_calls=False`` promises)."""
    calls = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if len(calls) <= 1:
        return message
    blocks = [b for b in message.blocks if not isinstance(b, ToolCallBlock)] + calls[:1]
    extra = dict(message.additional_kwargs)
    extra["tool_calls"] = list(extra.get("tool_calls") or ())[:1]
    return message.model_copy(update={"blocks": blocks, "additional_kwargs": extra})

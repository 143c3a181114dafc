"""LangChain messages <-> the engine's chat messages and tool calls.

Going in, messages become OpenAI-style dicts (assistant ``tool_calls``, ``tool`` results), which the
engine renders with each model's chat template. Coming out, the engine's parsed calls become
LangChain's ``tool_calls`` / ``invalid_tool_calls`` and, while streaming, ``tool_call_chunks``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    ToolMessage,
    get_buffer_string,
)
from langchain_core.messages.tool import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.messages.tool import invalid_tool_call as lc_invalid_tool_call
from langchain_core.messages.tool import tool_call as lc_tool_call
from langchain_core.messages.tool import tool_call_chunk as lc_tool_call_chunk
from proxyalign import tools as pa_tools

__all__ = [
    "has_tool_turns",
    "invalid_tool_calls",
    "to_engine_messages",
    "tool_call_chunks",
    "tool_calls",
    "transcript",
]

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}
_ROLES |= {"system": "system", "developer": "system"}
_NOT_TEXT = (
    "ChatProxyAlign handles text only: the hybrid decoder has no image, audio or file inputs "
    "(got a {!r} content block)"
)
#: Content blocks of an AI message that repeat its ``tool_calls`` (Anthropic's and LangChain v1's shapes).
_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "invalid_tool_call"})
_FUNCTION_MESSAGE = (
    "FunctionMessage belongs to OpenAI's legacy functions API; give tool results as "
    "ToolMessage(content, tool_call_id=...) answering an AIMessage's tool_calls"
)


def _text(message: BaseMessage) -> str:
    """The text of a message; blocks that repeat an AI message's tool calls are left out."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and message.type == "ai" and block.get("type") in _CALL_BLOCKS:
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise NotImplementedError(_NOT_TEXT.format(kind))
    return "".join(parts)


def _openai_call(call: ToolCall) -> dict[str, Any]:
    function = {"name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)}
    return {"id": call.get("id"), "type": "function", "function": function}


def _engine_message(message: BaseMessage) -> dict[str, Any]:
    if isinstance(message, FunctionMessage):
        raise NotImplementedError(_FUNCTION_MESSAGE)
    if isinstance(message, ToolMessage):
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": _text(message)}
    role = message.role if isinstance(message, ChatMessage) else message.type
    if role not in _ROLES:
        raise ValueError(
            f"cannot map a {role!r} message to a chat role; use system, human, ai or tool messages"
        )
    converted: dict[str, Any] = {"role": _ROLES[role], "content": _text(message)}
    calls = getattr(message, "tool_calls", None)
    if calls:
        converted["tool_calls"] = [_openai_call(call) for call in calls]
        converted["content"] = converted["content"] or None
    return converted


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> the engine's chat prompt (``[{"role", "content", ...}, ...]``): AI messages
    keep their ``tool_calls`` (OpenAI's shape), a ``ToolMessage`` becomes a ``tool`` message."""
    return [_engine_message(message) for message in messages]


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an engine chat holds tool calls or tool results."""
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def transcript(messages: Sequence[BaseMessage]) -> str:
    """A chat as plain text, for a model prompted without a chat template."""
    return get_buffer_string(messages, human_prefix="User", ai_prefix="Assistant") + "\nAssistant:"


# -- engine -> LangChain -------------------------------------------------------------------------------
def tool_calls(calls: Sequence[pa_tools.ToolCall]) -> list[ToolCall]:
    """The engine's parsed calls as LangChain's ``AIMessage.tool_calls``."""
    return [lc_tool_call(name=c.name, args=dict(c.parsed_arguments), id=c.id) for c in calls]


def invalid_tool_calls(issues: Sequence[pa_tools.ToolCallIssue]) -> list[InvalidToolCall]:
    """Blocks that looked like calls but were malformed: the block as written, and why it was refused."""
    return [lc_invalid_tool_call(name=None, args=i.text, id=None, error=f"{i.kind}: {i}") for i in issues]


def tool_call_chunks(deltas: Sequence[pa_tools.ToolCallDelta]) -> list[ToolCallChunk]:
    """Streamed call pieces as LangChain's ``tool_call_chunks`` (merged by ``index`` when added)."""
    return [lc_tool_call_chunk(name=d.name, args=d.arguments, id=d.id, index=d.index) for d in deltas]

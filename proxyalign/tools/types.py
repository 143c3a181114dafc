"""What parsing a model's output yields: tool calls, leftover content, problems, streaming deltas."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ISSUE_KINDS",
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallIssue",
]

#: Why a tool-call block was not accepted (``ToolCallIssue.kind``).
ISSUE_KINDS: tuple[str, ...] = ("bad_json", "missing_name", "bad_arguments", "unknown_tool", "unterminated")


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: ``arguments`` is the JSON text (OpenAI's ``function.arguments``),
    ``parsed_arguments`` the same object as a dict."""

    id: str
    name: str
    arguments: str
    parsed_arguments: dict[str, Any] = field(repr=False, hash=False)

    @classmethod
    def create(cls, id: str, name: str, arguments: dict[str, Any]) -> ToolCall:
        """A call whose JSON text is ``arguments`` serialized (non-ASCII kept as is)."""
        return cls(id, name, json.dumps(arguments, ensure_ascii=False), arguments)

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``, as in an assistant message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolCallIssue:
    """A block that looked like a tool call but was not accepted; its text stays in the content."""

    kind: str  # one of ISSUE_KINDS
    message: str
    text: str  # the block as the model wrote it, tags included

    def __str__(self) -> str:
        return self.message


@dataclass
class ParsedOutput:
    """A complete output split into ``content`` (the text outside accepted calls) and ``tool_calls``."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallIssue] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """An OpenAI assistant message; ``content`` is None when there are calls and no text."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["content"] = self.content or None
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call, in OpenAI's streaming shape: the first piece of ``index`` carries
    ``id`` and ``name``; ``arguments`` fragments concatenate to the call's JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """``{"index", "id", "type", "function": {"name", "arguments"}}`` without the absent keys."""
        function: dict[str, Any] = {"arguments": self.arguments}
        delta: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            delta["id"] = self.id
            delta["type"] = "function"
        if self.name is not None:
            function = {"name": self.name, **function}
        delta["function"] = function
        return delta


@dataclass(frozen=True)
class StreamDelta:
    """What one ``feed`` (or ``finish``) of a stream parser releases."""

    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    errors: tuple[ToolCallIssue, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls or self.errors)

"""Recognizing an output that is nothing but bare JSON call objects (no ``<tool_call>`` tags).

Small models often answer a tool prompt with the call object alone: Qwen2.5-Coder-0.5B-Instruct, the
project's aligned model, writes ``{"name": "get_weather", "arguments": {"city": "Paris"}}`` or the
same inside a ```json fence. :class:`UntaggedCallScanner` reads an output character by character and
says as early as possible when it can no longer be such a document, so a stream parser holds back
only outputs that begin like one (``{`` or a ```json fence).

An untagged document is: optional whitespace, an optional ```json (or bare ```) fence line, one or more
JSON objects separated by whitespace, the closing fence if one was opened (it may be missing at the
end), whitespace. Every object must have exactly ``name`` and ``arguments`` (or ``parameters``), pass
the parser's own checks, and name a tool of the request's tool list.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["UntaggedCallScanner"]

_KEYS = frozenset({"name", "arguments", "parameters"})
_OPEN_FENCES = ("```", "```json")


class UntaggedCallScanner:
    """Incremental: :meth:`push` text until it returns False (not a call document), or :meth:`finish`."""

    def __init__(self, decode: Callable[[str], tuple[str, dict[str, Any]]], names: frozenset[str]) -> None:
        self._decode = decode
        self._names = names
        self.text = ""  # everything pushed
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._pos = 0
        self._state = "start"  # start, fence_open, between, object, fence_close, trailing
        self._fenced = False
        self._fence = ""
        self._object_at = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._failed = False

    def push(self, text: str) -> bool:
        """Add text; False once the output cannot be an untagged call document (then for good)."""
        if self._failed:
            return False
        self.text += text
        while self._pos < len(self.text):
            if not self._step(self.text[self._pos]):
                self._failed = True
                return False
            self._pos += 1
        return True

    def finish(self) -> list[tuple[str, dict[str, Any]]] | None:
        """The calls, if the complete output is an untagged call document; else None."""
        if self._failed or not self.calls or self._state not in ("between", "trailing"):
            return None
        return self.calls

    def _step(self, char: str) -> bool:
        state = self._state
        if state == "object":
            return self._object_char(char)
        if state in ("start", "between"):
            if char.isspace():
                return True
            if char == "{":
                self._state, self._object_at, self._depth = "object", self._pos, 1
                return True
            if char == "`" and (state == "start" or self._fenced):
                self._state = "fence_open" if state == "start" else "fence_close"
                self._fence = char
                return True
            return False
        if state == "fence_open":
            if char == "\n":
                self._fenced, self._state = True, "between"
                return self._fence.rstrip().lower() in _OPEN_FENCES
            self._fence += char
            return any(fence.startswith(self._fence.lower()) for fence in _OPEN_FENCES)
        if state == "fence_close":
            self._fence += char
            if self._fence == "```":
                self._state = "trailing"
            return "```".startswith(self._fence)
        return char.isspace()  # trailing

    def _object_char(self, char: str) -> bool:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
            return True
        if char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._state = "between"
                return self._accept(self.text[self._object_at : self._pos + 1])
        return True

    def _accept(self, text: str) -> bool:
        try:
            value = json.loads(text)
            if not isinstance(value, dict) or "name" not in value or not set(value) <= _KEYS:
                return False
            if "arguments" not in value and "parameters" not in value:
                return False
            name, arguments = self._decode(text)
        except Exception:
            return False
        if name not in self._names:
            return False
        self.calls.append((name, arguments))
        return True

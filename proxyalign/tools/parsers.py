"""Tool-call parsers: the base classes and the built-in ``<tool_call>`` JSON-block formats.

A parser belongs to a chat-template *family*: :meth:`ToolCallParser.detect` says whether a template is
one of its own, :meth:`ToolCallParser.parse` splits a complete output into content and calls, and
:meth:`ToolCallParser.stream` returns a :class:`StreamParser` that does the same on text deltas.

Built-ins (registered through the same ``register_tool_parsers`` hook a plugin uses):

- ``hermes``: Hermes / Qwen2.5 templates (any template that mentions ``<tool_call>``)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- ``plain``: the fallback for a model prompted without a tool-aware template: the same blocks, which is
  what :func:`proxyalign.tools.render.render_tools_text` asks for. A base model prompted plain and an
  aligned model prompted with a Hermes/Qwen template therefore write one format, and one parser reads a
  hybrid output.

Both also read an output that is nothing but bare call objects when a tool list is given
(:mod:`proxyalign.tools.untagged`): that is how Qwen2.5-Coder-0.5B-Instruct answers.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from proxyalign.errors import InvalidParameterError, ToolCallError
from proxyalign.hookspecs import hookimpl
from proxyalign.tools.types import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta, ToolCallIssue
from proxyalign.tools.untagged import UntaggedCallScanner

__all__ = [
    "BlockError",
    "CallIds",
    "HermesParser",
    "PlainTextParser",
    "StreamParser",
    "TaggedBlockParser",
    "TaggedBlockStream",
    "ToolCallParser",
    "tool_names",
]

ToolsArg = Iterable[Mapping[str, Any] | str] | None


class CallIds:
    """Call ids ``call_`` + 24 hex digits: random, or reproducible from ``seed``."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed) if seed is not None else None

    def new(self) -> str:
        bits = self._rng.getrandbits(96) if self._rng is not None else secrets.randbits(96)
        return f"call_{bits:024x}"


def tool_names(tools: ToolsArg) -> frozenset[str] | None:
    """The names in an OpenAI ``tools`` list (or a list of names); None when no list is given."""
    if tools is None:
        return None
    if isinstance(tools, str | bytes | Mapping):
        raise InvalidParameterError("tools must be a list of tools (or of tool names), not a single value")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if isinstance(tool, str):
            names.add(tool)
            continue
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidParameterError(f"tools[{i}] has no function name: {tool!r}")
        names.add(name)
    return frozenset(names)


class StreamParser:
    """Incremental parsing of one output: :meth:`feed` text deltas, then :meth:`finish` once.

    Each call returns a :class:`StreamDelta` with the content now safe to show, completed calls (as
    OpenAI streaming tool-call deltas) and problems found. Concatenating every delta gives exactly what
    :meth:`ToolCallParser.parse` returns for the whole text, however the text was split.
    Subclasses implement :meth:`_consume` with the helpers ``_emit_content``, ``_emit_call``, ``_emit_issue``.
    """

    def __init__(self, *, tools: ToolsArg = None, seed: int | None = None) -> None:
        self._names = tool_names(tools)
        self._ids = CallIds(seed)
        self._output = ParsedOutput()
        self._finished = False
        self._delta_content: list[str] = []
        self._delta_calls: list[ToolCallDelta] = []
        self._delta_issues: list[ToolCallIssue] = []

    @property
    def output(self) -> ParsedOutput:
        """Everything released so far (the whole result after :meth:`finish`)."""
        return self._output

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, text: str) -> StreamDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not isinstance(text, str):
            raise TypeError(f"feed() takes text, got {type(text).__name__}")
        self._consume(text, final=False)
        return self._take()

    def finish(self) -> StreamDelta:
        """The output ended: decide everything still held back (an open block is unterminated)."""
        if self._finished:
            return StreamDelta()
        self._finished = True
        self._consume("", final=True)
        return self._take()

    def _consume(self, text: str, final: bool) -> None:
        raise NotImplementedError

    def _emit_content(self, text: str) -> None:
        if text:
            self._delta_content.append(text)
            self._output.content += text

    def _emit_call(self, name: str, arguments: dict[str, Any]) -> ToolCall:
        call = ToolCall.create(self._ids.new(), name, arguments)
        index = len(self._output.tool_calls)
        self._output.tool_calls.append(call)
        self._delta_calls.append(ToolCallDelta(index, call.id, call.name, call.arguments))
        return call

    def _emit_issue(self, kind: str, message: str, text: str) -> None:
        issue = ToolCallIssue(kind, message, text)
        self._output.errors.append(issue)
        self._delta_issues.append(issue)

    def _unknown_tool(self, name: str) -> str | None:
        """Why ``name`` is refused (a tool list was given and lacks it), else None."""
        if self._names is None or name in self._names:
            return None
        return f"unknown tool {name!r}; available: {', '.join(sorted(self._names)) or 'none'}"

    def _take(self) -> StreamDelta:
        delta = StreamDelta("".join(self._delta_content), tuple(self._delta_calls), tuple(self._delta_issues))
        self._delta_content, self._delta_calls, self._delta_issues = [], [], []
        return delta


class ToolCallParser:
    """A tool-call format. Subclass, set ``family`` (the registry name) and implement :meth:`stream`;
    :meth:`parse` runs the stream parser over the whole text, so both always agree."""

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    def detect(cls, chat_template: str) -> bool:
        """Whether ``chat_template`` (a Jinja source) belongs to this family. Default: never."""
        return False

    def stream(self, *, tools: ToolsArg = None, seed: int | None = None) -> StreamParser:
        """A parser for one streamed output. ``tools``: refuse calls to other names; ``seed``: call ids."""
        raise NotImplementedError

    def call_grammar(self, rule: str, literal: Callable[[str], str]) -> str | None:
        """The Lark body of one call in this format around the JSON call object ``rule`` (``{"name",
        "arguments"}``), for a forced ``tool_choice``; ``literal(text)`` quotes fixed text (a special
        token where the vocabulary has one). None: this format cannot be constrained."""
        return None

    def parse(
        self, text: str, *, tools: ToolsArg = None, seed: int | None = None, strict: bool = False
    ) -> ParsedOutput:
        """Split a complete output. Malformed blocks stay in the content and are listed in ``errors``;
        with ``strict=True`` they raise :class:`~proxyalign.errors.ToolCallError` instead."""
        parser = self.stream(tools=tools, seed=seed)
        parser.feed(text)
        parser.finish()
        output = parser.output
        if strict and output.errors:
            problems = "; ".join(str(issue) for issue in output.errors)
            raise ToolCallError(f"{len(output.errors)} malformed tool call(s) ({self.family}): {problems}")
        return output


class BlockError(Exception):
    """Raised by :meth:`TaggedBlockParser.decode_block`: ``kind`` is one of ``ISSUE_KINDS``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class TaggedBlockParser(ToolCallParser):
    """Calls written as ``open_tag`` body ``close_tag`` blocks; :meth:`decode_block` reads a body.

    Subclasses set the tags and may override :meth:`decode_block` (default: a JSON object with ``name``
    and ``arguments``). A block ends at the first ``close_tag`` after its ``open_tag``.

    With ``untagged_calls`` (default) and a tool list, an output that is nothing but bare call objects
    (no tags; maybe in a ```json fence) is read as calls too: see :mod:`proxyalign.tools.untagged`.
    """

    open_tag: ClassVar[str] = "<tool_call>"
    close_tag: ClassVar[str] = "</tool_call>"
    untagged_calls: ClassVar[bool] = True

    def stream(self, *, tools: ToolsArg = None, seed: int | None = None) -> StreamParser:
        return TaggedBlockStream(self, tools=tools, seed=seed)

    def call_grammar(self, rule: str, literal: Callable[[str], str]) -> str | None:
        newline = literal("\n")
        return f"{literal(self.open_tag)} {newline} {rule} {newline} {literal(self.close_tag)}"

    def decode_block(self, body: str) -> tuple[str, dict[str, Any]]:
        """``(name, arguments)`` from the text between the tags, or :class:`BlockError`.

        Accepted: ``{"name": str, "arguments": {...}}``; ``parameters`` for ``arguments``; arguments
        absent (``{}``) or a JSON string holding an object (double-encoded).
        """
        text = body.strip()
        if not text:
            raise BlockError("bad_json", "the block is empty")
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise BlockError(
                "bad_json", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except (ValueError, RecursionError) as exc:  # NaN/Infinity, absurd nesting
            raise BlockError("bad_json", f"not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise BlockError("bad_json", f"expected a JSON object, got {_json_type(value)}")
        name = value.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BlockError("missing_name", 'no "name" (a non-empty string) in the call')
        arguments = value["arguments"] if "arguments" in value else value.get("parameters", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments, parse_constant=_refuse_constant)
            except (ValueError, RecursionError):
                raise BlockError("bad_arguments", '"arguments" is a string that is not JSON') from None
        if not isinstance(arguments, dict):
            raise BlockError(
                "bad_arguments", f'"arguments" must be a JSON object, got {_json_type(arguments)}'
            )
        return name.strip(), arguments


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class TaggedBlockStream(StreamParser):
    """The stream parser of a :class:`TaggedBlockParser`.

    Hold-back, like stop strings: outside a block, an end of the text that could begin ``open_tag`` is
    held until the next delta decides it. Inside a block everything is held until ``close_tag``: the call
    is released whole (one delta with id, name and all the arguments) only once it is known to be
    well formed, because a released call cannot be taken back. A malformed or unterminated block is
    released as content. Whitespace that touches an accepted block is framing, not content: the
    whitespace before an opening tag is dropped, and the whitespace after a closing tag too unless text
    came before the block and more text follows it. So whitespace at the end of the content is held
    until the next non-whitespace text or the end of the output. Before any of this, an output that
    begins like an untagged call document (``{`` or a ```json fence, with a tool list) is held whole
    until it is known not to be one, or to the end.
    """

    def __init__(self, parser: TaggedBlockParser, *, tools: ToolsArg = None, seed: int | None = None) -> None:
        super().__init__(tools=tools, seed=seed)
        self._open, self._close = parser.open_tag, parser.close_tag
        self._decode = parser.decode_block
        self._buffer = ""  # undecided: a possible start of open_tag, or the body of the open block
        self._start = 0  # position of _buffer[0] in the whole output
        self._inside = False
        self._block_at = 0  # position of the open block's open_tag
        self._blocks = 0
        self._searched = 0  # the body before this index holds no close_tag
        self._pending_ws = ""  # decided whitespace whose fate depends on what comes next
        self._after_block = False  # the last decided thing is an accepted call
        self._has_text = False  # non-whitespace content was released
        self._untagged = (
            UntaggedCallScanner(parser.decode_block, self._names)
            if parser.untagged_calls and self._names is not None
            else None
        )

    def _consume(self, text: str, final: bool) -> None:
        if self._untagged is not None:
            scanner = self._untagged
            if scanner.push(text) and not final:
                return  # may still be nothing but bare call objects: hold it all
            self._untagged = None
            calls = scanner.finish() if final else None
            if calls is not None:
                for name, arguments in calls:
                    self._emit_call(name, arguments)
                return
            text = scanner.text  # not a call document: read it all as usual
        self._buffer += text
        while True:
            if self._inside:
                end = self._buffer.find(self._close, self._searched)
                if end >= 0:
                    body = self._buffer[:end]
                    self._advance(end + len(self._close))
                    self._inside = False
                    self._block(body)
                    continue
                if not final:
                    self._searched = max(0, len(self._buffer) - len(self._close) + 1)
                    return
                raw = self._open + self._buffer
                self._emit_issue("unterminated", self._where(f"no closing {self._close}"), raw)
                self._advance(len(self._buffer))
                self._inside = False
                self._text(raw)
                continue
            begin = self._buffer.find(self._open)
            if begin >= 0:
                self._text(self._buffer[:begin])
                self._block_at = self._start + begin
                self._blocks += 1
                self._advance(begin + len(self._open))
                self._inside = True
                self._searched = 0
                continue
            keep = 0 if final else _partial_suffix(self._buffer, self._open)
            decided = len(self._buffer) - keep
            self._text(self._buffer[:decided])
            self._advance(decided)
            if final and not self._after_block:
                self._emit_content(self._pending_ws)
            if final:
                self._pending_ws = ""
            return

    def _advance(self, size: int) -> None:
        self._buffer = self._buffer[size:]
        self._start += size

    def _where(self, problem: str) -> str:
        return f"tool call {self._blocks} (character {self._block_at}): {problem}"

    def _block(self, body: str) -> None:
        raw = self._open + body + self._close
        try:
            name, arguments = self._decode(body)
        except BlockError as exc:
            self._emit_issue(exc.kind, self._where(str(exc)), raw)
            self._text(raw)
            return
        refused = self._unknown_tool(name)
        if refused is not None:
            self._emit_issue("unknown_tool", self._where(refused), raw)
            self._text(raw)
            return
        self._pending_ws = ""  # whitespace before an accepted block is framing
        self._after_block = True
        self._emit_call(name, arguments)

    def _text(self, text: str) -> None:
        """Release decided content, holding its trailing whitespace (see the class docstring)."""
        core = text.strip()
        if not core:
            self._pending_ws += text
            return
        lead = text[: len(text) - len(text.lstrip())]
        if self._has_text or not self._after_block:
            self._emit_content(self._pending_ws + lead)
        self._emit_content(core)
        self._pending_ws = text[len(text.rstrip()) :]
        self._has_text = True
        self._after_block = False


class HermesParser(TaggedBlockParser):
    """Hermes / Qwen2.5 tool calls: ``<tool_call>`` JSON ``</tool_call>`` blocks."""

    family = "hermes"
    description = (
        'Hermes and Qwen2.5 templates: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> blocks'
    )

    @classmethod
    def detect(cls, chat_template: str) -> bool:
        return cls.open_tag in chat_template


class PlainTextParser(TaggedBlockParser):
    """The fallback for models prompted without a tool-aware template (see render.render_tools_text)."""

    family = "plain"
    description = (
        "models without a tool-aware template, prompted with render_tools_text: <tool_call> JSON blocks"
    )


@hookimpl
def register_tool_parsers(register: Any) -> None:
    register(HermesParser)
    register(PlainTextParser)

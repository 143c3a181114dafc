"""The wire format: OpenAI-shaped request and response models (pydantic), plus proxyalign's extensions.

Requests are strict about types (``"0.5"`` is not a number, ``true`` is not an integer) and accept
unknown fields, so the server can answer a parameter it does not support with a 400 that names it
(see :mod:`proxyalign.server.translate`) instead of dropping it silently.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionRequest",
    "Delta",
    "FunctionCall",
    "ModelCard",
    "ModelList",
    "Provenance",
    "StreamOptions",
    "TokenProvenance",
    "ToolCallPayload",
    "Usage",
    "new_id",
]


def new_id(prefix: str) -> str:
    """A response id in OpenAI's style (``chatcmpl-...``, ``cmpl-...``)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


class _Response(BaseModel):
    """A response model whose listed fields are left out when None (OpenAI omits e.g. ``usage`` from
    chunks; proxyalign's ``proxyalign`` extension only appears when asked for)."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


# -- requests --------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None  #: a last chunk with the request's usage and no choices


class ChatMessage(BaseModel):
    """One chat message. ``content`` is text or a list of ``{"type": "text", "text": ...}`` parts; an
    assistant's ``tool_calls`` and a tool result's ``tool_call_id`` are OpenAI's. The roles and parts
    the hybrid cannot take are refused by the translation, naming the message."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class GenerationRequest(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``.

    OpenAI's parameters that the hybrid honours, then proxyalign's extensions (``criterion``,
    ``criterion_params``, ``criterion_on``, ``mode``, ``gamma``, ``top_k``, ``provenance``).
    """

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # proxyalign's extensions
    criterion: str | None = None
    criterion_params: dict[str, Any] | None = None
    criterion_on: str | None = None
    mode: str | None = None
    gamma: int | str | None = None
    top_k: int | None = None
    provenance: bool | None = None  #: per-choice sources and rejection rate (default: on unless streaming)
    #: OpenAI's json_object / json_schema, or (extensions) {"type": "regex", "pattern": ...} and
    #: {"type": "lark", "grammar": ...}; the core checks the value and enforces it with a grammar
    response_format: dict[str, Any] | None = None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, or (extension) a mapping from
    model role to text, e.g. ``{"base": few_shot_text, "aligned": question}``."""

    prompt: Any


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  #: OpenAI's newer name for ``max_tokens``
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  #: false: at most one call per choice (the first)


# -- responses -------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenProvenance(BaseModel):
    """Which model produced each token of a streamed piece (``sources[i]`` belongs to ``token_ids[i]``)."""

    sources: list[str]
    token_ids: list[int]


class Provenance(TokenProvenance, _Response):
    """Provenance of a whole choice: every token's source and the hybrid's statistics; with tools, why
    any call-like block was not accepted as a call (its text stays in the content)."""

    _omit_if_none = ("tool_call_errors",)

    rejection_rate: float | None = None  #: fraction of p's drafts that the criterion rejected
    tokens_from_base: int = 0
    tokens_from_aligned: int = 0
    tokens_from_target: int = 0
    criterion: str | None = None
    stop_sequence: str | None = None
    tool_call_errors: list[str] | None = None


class CompletionChoice(_Response):
    _omit_if_none = ("proxyalign",)

    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None
    proxyalign: TokenProvenance | Provenance | None = None


class Completion(_Response):
    _omit_if_none = ("usage",)

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(Completion):
    """A streamed piece of a completion (OpenAI uses the same ``object`` for both)."""


class FunctionCall(_Response):
    """A call's function: in a streamed piece, ``name`` comes once and ``arguments`` in fragments."""

    _omit_if_none = ("name", "arguments")

    name: str | None = None
    arguments: str | None = None


class ToolCallPayload(_Response):
    """A tool call as OpenAI writes it: whole in a message (no ``index``), in pieces in a stream (the
    first piece of an ``index`` carries ``id``, ``type`` and the name)."""

    _omit_if_none = ("index", "id", "type")

    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class AssistantMessage(_Response):
    """``content`` is None when the answer is only tool calls; ``tool_calls`` is left out when none."""

    _omit_if_none = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallPayload] | None = None


#: OpenAI's finish reasons that a choice of this server can have.
FinishReasonName = Literal["stop", "length", "tool_calls"]


class ChatChoice(_Response):
    _omit_if_none = ("proxyalign",)

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReasonName | None = None
    proxyalign: Provenance | None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(_Response):
    _omit_if_none = ("role", "content", "tool_calls")

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallPayload] | None = None


class ChatChunkChoice(_Response):
    _omit_if_none = ("proxyalign",)

    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReasonName | None = None
    proxyalign: TokenProvenance | Provenance | None = None


class ChatCompletionChunk(_Response):
    _omit_if_none = ("usage",)

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``; ``proxyalign`` says which models and criterion serve it."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "proxyalign"
    proxyalign: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

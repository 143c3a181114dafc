"""Server-sent events in OpenAI's wire format, on a response that notices a client leaving.

A streamed completion is ``data: {chunk JSON}`` events and a final ``data: [DONE]``. Starlette's
``StreamingResponse`` is reused; :class:`EventStreamResponse` only makes sure that a disconnect is
noticed even while no token is being sent (a request still queued, a long prefill) and that the body
iterator is always closed, which closes the aligner's stream and aborts the rows within one step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from proxyalign.engine.results import Generation, GenerationChunk
from proxyalign.errors import ProxyAlignError
from proxyalign.server.errors import error_body, proxyalign_error
from proxyalign.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    Delta,
    new_id,
)
from proxyalign.server.service import (
    Tracker,
    chunk_provenance,
    finish_reason,
    provenance_of,
    tool_call_pieces,
    usage_of,
)
from proxyalign.server.translate import Plan

__all__ = ["EventStreamResponse", "chat_events", "completion_events", "sse"]

logger = logging.getLogger("proxyalign.server")

DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    """One server-sent event carrying JSON (a pydantic model or a plain mapping)."""
    text = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {text}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that ends (and closes its body iterator) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while we were sending
                    pass
                finally:
                    group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        try:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
        finally:
            if self.on_close is not None:  # also when the body never started (an early disconnect)
                self.on_close()


async def _events(
    plan: Plan,
    tracker: Tracker,
    stream: AsyncIterator[GenerationChunk],
    opening: list[bytes],
    piece: Any,
    closing: Any,
) -> AsyncIterator[bytes]:
    """The shared loop: opening events, one event per chunk that ``piece`` makes one of (None: nothing
    to send yet), the usage event, ``[DONE]``; a failure mid-stream becomes an error event. Counts the
    request however it ends (a cancelled or closed iteration is a client that disconnected)."""
    metrics = tracker.service.metrics
    generations: list[Generation | None] = [None] * len(plan.rows)
    outcome = "disconnected"
    try:
        for event in opening:
            yield event
        async for chunk in stream:
            if chunk.token_ids:
                tracker.token()
            if chunk.generation is not None:
                generations[chunk.index] = chunk.generation
                metrics.record_generation(chunk.generation)
            event = piece(chunk)
            if event is not None:
                yield sse(event)
        if plan.include_usage:
            yield sse(closing(usage_of([g for g in generations if g is not None], plan.n)))
        outcome = "success"
        yield DONE
    except ProxyAlignError as exc:  # a criterion failed mid-way, or the engine closed
        error = proxyalign_error(exc)
        outcome = "failed"
        yield sse(error_body(error.status, error.message, error.param, error.code))
        yield DONE
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # aborts whatever still decodes
        tracker.finish(outcome)


def chat_events(
    plan: Plan, tracker: Tracker, stream: AsyncIterator[GenerationChunk], model: str, criterion: str
) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: the assistant role first, then content and tool-call deltas
    (text that may begin a call is held back by the core until it is known not to)."""
    ident, created = new_id("chatcmpl"), int(time.time())

    def chunk_of(choices: list[ChatChunkChoice], usage: Any = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=ident, created=created, model=model, choices=choices, usage=usage)

    opening = [
        sse(chunk_of([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))]))
        for i in range(len(plan.rows))
    ]

    def piece(chunk: GenerationChunk) -> ChatCompletionChunk | None:
        content = chunk.text if chunk.content is None else chunk.content
        calls = tool_call_pieces(chunk, plan.single_tool_call)
        if not (content or calls or _must_send(plan, chunk)):
            return None
        choice = ChatChunkChoice(
            index=chunk.index,
            delta=Delta(content=content or (None if calls else ""), tool_calls=calls),
            finish_reason=finish_reason(chunk.finish_reason, chunk.generation),  # type: ignore[arg-type]
            proxyalign=_provenance(plan, chunk, criterion),
        )
        return chunk_of([choice])

    return _events(plan, tracker, stream, opening, piece, lambda usage: chunk_of([], usage))


def completion_events(
    plan: Plan, tracker: Tracker, stream: AsyncIterator[GenerationChunk], model: str, criterion: str
) -> AsyncIterator[bytes]:
    """``text_completion`` events, one per piece of text."""
    ident, created = new_id("cmpl"), int(time.time())

    def piece(chunk: GenerationChunk) -> CompletionChunk | None:
        if not (chunk.text or _must_send(plan, chunk)):
            return None
        choice = CompletionChoice(
            index=chunk.index,
            text=chunk.text,
            finish_reason=finish_reason(chunk.finish_reason),  # type: ignore[arg-type]
            proxyalign=_provenance(plan, chunk, criterion),
        )
        return CompletionChunk(id=ident, created=created, model=model, choices=[choice])

    def closing(usage: Any) -> CompletionChunk:
        return CompletionChunk(id=ident, created=created, model=model, choices=[], usage=usage)

    return _events(plan, tracker, stream, [], piece, closing)


def _must_send(plan: Plan, chunk: GenerationChunk) -> bool:
    """A chunk without new text is still sent when it ends its choice, or carries tokens whose
    provenance was asked for (concatenated, the chunks' sources are the choice's)."""
    return chunk.finish_reason is not None or bool(plan.provenance and chunk.token_ids)


def _provenance(plan: Plan, chunk: GenerationChunk, criterion: str) -> Any:
    """With provenance on: this piece's tokens and their sources; a choice's last piece adds the whole
    choice's statistics (rejection rate, tokens from each model)."""
    if not plan.provenance:
        return None
    if chunk.generation is not None:
        return provenance_of(chunk.generation, criterion, chunk)
    return chunk_provenance(chunk)

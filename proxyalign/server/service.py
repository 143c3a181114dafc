"""Running planned requests on the aligner's one running batch: admission, streams, usage, metrics.

The HTTP layer never touches models: it hands a :class:`~proxyalign.server.translate.Plan` to
:class:`GenerationService`, which admits it (or answers 429/503 with ``Retry-After``), validates and
tokenizes it off the event loop, and streams it with ``ProxyAligner.astream_batch``. Closing a stream (a
client that went away) aborts its rows within one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxyalign.engine.results import FinishReason, Generation, GenerationChunk
from proxyalign.engine.scheduler import reserved_tokens
from proxyalign.errors import ProxyAlignError
from proxyalign.prompts import prompt_name
from proxyalign.server.config import ServerConfig
from proxyalign.server.errors import APIError, proxyalign_error
from proxyalign.server.metrics import ServerMetrics
from proxyalign.server.protocol import (
    AssistantMessage,
    Provenance,
    TokenProvenance,
    ToolCallPayload,
    Usage,
)
from proxyalign.server.translate import Plan, log_ignored

__all__ = [
    "GenerationService",
    "Tracker",
    "assistant_message",
    "finish_reason",
    "provenance_of",
    "tool_call_pieces",
    "usage_of",
]

logger = logging.getLogger("proxyalign.server")


def finish_reason(reason: FinishReason | None, generation: Generation | None = None) -> str | None:
    """OpenAI's finish reasons: an EOS token or a stop string is ``stop``, the token limit ``length``;
    a choice that ended by itself with tool calls is ``tool_calls`` (the client runs them). A choice cut
    by the limit stays ``length``, calls or not, so the client knows it is truncated."""
    if reason is None:
        return None
    if reason == FinishReason.LENGTH:
        return "length"
    return "tool_calls" if generation is not None and generation.tool_calls else "stop"


def assistant_message(generation: Generation, single_tool_call: bool = False) -> AssistantMessage:
    """A non-streamed choice's message: the text outside calls, and the calls (only the first with
    ``parallel_tool_calls: false``); ``content`` is None when there are calls and no text."""
    calls = generation.tool_calls[:1] if single_tool_call else generation.tool_calls
    if not calls:
        return AssistantMessage(content=generation.content)
    payloads = [ToolCallPayload.model_validate(call.to_openai()) for call in calls]
    return AssistantMessage(content=generation.content or None, tool_calls=payloads)


def tool_call_pieces(chunk: GenerationChunk, single_tool_call: bool = False) -> list[ToolCallPayload] | None:
    """A streamed chunk's pieces of calls in OpenAI's delta shape (only call 0's with
    ``parallel_tool_calls: false``), or None when it has none."""
    pieces = [
        ToolCallPayload.model_validate(delta.to_openai())
        for delta in chunk.tool_calls
        if not single_tool_call or delta.index == 0
    ]
    return pieces or None


def provenance_of(
    generation: Generation, criterion: str | None, piece: GenerationChunk | None = None
) -> Provenance:
    """A choice's provenance: every token's source (or only ``piece``'s, for a streamed last piece) and
    the choice's statistics."""
    stats = generation.stats
    tokens = piece if piece is not None else generation
    return Provenance(
        sources=[str(s) for s in tokens.sources],
        token_ids=list(tokens.token_ids),
        rejection_rate=stats.rejection_rate,
        tokens_from_base=stats.tokens_from_base,
        tokens_from_aligned=stats.tokens_from_aligned,
        tokens_from_target=stats.tokens_from_target,
        criterion=criterion,
        stop_sequence=generation.stop_sequence,
        tool_call_errors=[issue.message for issue in generation.tool_call_errors] or None,
    )


def chunk_provenance(chunk: GenerationChunk) -> TokenProvenance:
    return TokenProvenance(sources=[str(s) for s in chunk.sources], token_ids=list(chunk.token_ids))


def usage_of(generations: list[Generation], n: int) -> Usage:
    """Usage as OpenAI counts it: each prompt's tokens once (not once per choice), every choice's tokens."""
    prompt = sum(g.stats.prompt_tokens for g in generations[::n])
    completion = sum(g.stats.new_tokens for g in generations)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass
class Tracker:
    """One generation request's life, for metrics and the server's admission count."""

    service: GenerationService
    endpoint: str
    rows: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    outcome: str | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.service.metrics.ttft.labels(self.endpoint).observe(self.first_token - self.started)

    def finish(self, outcome: str) -> None:
        """Count the request once, however it ended, and give its rows back."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        metrics = self.service.metrics
        metrics.requests.labels(self.endpoint, outcome).inc()
        metrics.in_progress.dec()
        if outcome == "success":
            metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.started)
        self.service.release(self.rows)

    def fail(self, exc: BaseException) -> None:
        status = exc.status if isinstance(exc, APIError) else 500
        outcomes = {429: "rejected", 503: "unavailable"}
        self.finish(outcomes.get(status, "invalid" if status < 500 else "failed"))


class GenerationService:
    """Admission and execution of planned requests on one aligner."""

    def __init__(self, aligner: Any, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.aligner = aligner
        self.config = config
        self.metrics = metrics
        self.rows_in_flight = 0  #: rows this server has admitted and not finished
        self.requests_in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission --------------------------------------------------------------------------------
    def track(self, endpoint: str) -> Tracker:
        self.metrics.in_progress.inc()
        self.requests_in_flight += 1
        self._idle.clear()
        return Tracker(self, endpoint)

    def admit(self, tracker: Tracker, rows: int) -> None:
        """Take ``rows`` rows, or refuse: 503 while draining, 429 when they would queue beyond
        ``max_waiting`` behind a full batch. Synchronous, so concurrent requests cannot both slip in."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance", headers=retry)
        status = self.aligner.status()
        busy = max(self.rows_in_flight, status["running"] + status["waiting"])
        queued = busy + rows - status["max_rows"]
        if queued > self.config.max_waiting:
            raise APIError(
                429,
                f"the server is busy: {busy} rows in flight for a batch of {status['max_rows']} and "
                f"{self.config.max_waiting} queued places; retry after {self.config.retry_after_s} s",
                code="server_busy",
                headers=retry,
            )
        self.rows_in_flight += rows
        tracker.rows = rows

    def release(self, rows: int) -> None:
        self.rows_in_flight -= rows
        self.requests_in_flight -= 1
        if self.requests_in_flight == 0:
            self._idle.set()

    # -- running --------------------------------------------------------------------------------------
    async def open(self, plan: Plan, tracker: Tracker) -> AsyncIterator[GenerationChunk]:
        """Admit the plan and return its stream of chunks; every check (options, prompts, limits) is done
        here, off the event loop, so a bad request is refused before any response starts."""
        log_ignored(plan)
        self.admit(tracker, len(plan.rows))
        try:
            stream, prompt_tokens = await asyncio.to_thread(self._prepare, plan)
        except ProxyAlignError as exc:
            raise proxyalign_error(
                exc, retry_after_s=self.config.retry_after_s, prompt_field=plan.prompt_field
            ) from None
        self.metrics.prompt_tokens.inc(prompt_tokens)
        return stream

    def _prepare(self, plan: Plan) -> tuple[AsyncIterator[GenerationChunk], int]:
        aligner, config = self.aligner, self.config
        # one Request per row (choice), validated and tokenized once; row i is seeded derive_seed(seed, i)
        checked = aligner.requests(plan.rows, **plan.options)
        capacity = aligner.status()["max_cached_tokens"]
        for position, request in enumerate(checked[:: plan.n]):
            where = prompt_name(None if len(plan.prompts) == 1 else position)
            if request.longest_prompt > config.max_prompt_tokens:
                raise APIError(
                    400,
                    f"{where} has {request.longest_prompt} tokens; at most {config.max_prompt_tokens} on "
                    "this server",
                    param=plan.prompt_field,
                    code="context_length_exceeded",
                )
            if reserved_tokens(request) > capacity:
                raise APIError(
                    400,
                    f"{where} ({request.longest_prompt} tokens) with max_tokens={request.max_new_tokens} "
                    f"needs {reserved_tokens(request)} cache positions, more than this server's "
                    f"{capacity}; shorten it or ask for fewer tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        prompt_tokens = sum(r.prompt_tokens for r in checked[:: plan.n])
        return aligner.astream_requests(checked), prompt_tokens

    async def generate(self, plan: Plan, tracker: Tracker) -> list[Generation]:
        """Every row's :class:`Generation`, in choice order (a non-streamed response)."""
        stream = await self.open(plan, tracker)
        results: list[Generation | None] = [None] * len(plan.rows)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.token_ids:
                    tracker.token()
                if chunk.generation is not None:
                    results[chunk.index] = chunk.generation
                    self.metrics.record_generation(chunk.generation)
        return [g for g in results if g is not None]

    async def drain(self, seconds: float) -> None:
        """Refuse new requests (503) and wait up to ``seconds`` for the running ones to finish."""
        self.draining = True
        if self.requests_in_flight:
            logger.info("draining %d request(s), up to %.0f s", self.requests_in_flight, seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=seconds)

"""``create_app(aligner, config)``: the OpenAI-compatible FastAPI app over one ``ProxyAligner``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events), ``GET /health``, ``GET /metrics``. Every request of every client goes to the
aligner's one running batch through its async API, so concurrent requests decode side by side and the
event loop never waits on a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxyalign.engine.results import Generation
from proxyalign.errors import ProxyAlignError
from proxyalign.server.config import ServerConfig
from proxyalign.server.errors import APIError, install_error_handlers, proxyalign_error
from proxyalign.server.limits import BodyLimitMiddleware
from proxyalign.server.metrics import ServerMetrics
from proxyalign.server.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from proxyalign.server.security import api_key_check
from proxyalign.server.service import (
    GenerationService,
    Tracker,
    assistant_message,
    finish_reason,
    provenance_of,
    usage_of,
)
from proxyalign.server.streaming import EventStreamResponse, chat_events, completion_events
from proxyalign.server.translate import Plan, plan_chat, plan_completion

__all__ = ["create_app"]

logger = logging.getLogger("proxyalign.server")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client of a non-streamed request went away before its answer was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first; then cancel it (which aborts its rows)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class ResponseCounter:
    """Counts every HTTP response by route template and status (an ASGI middleware, so 401s, 404s and
    413s answered before any route runs are counted too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http.labels(path, str(status)).inc()


def chat_reply(generations: list[Generation], plan: Plan, criterion: str, model: str) -> ChatCompletion:
    """A non-streamed chat answer: one choice per row, usage, and provenance when asked for."""
    choices = [
        ChatChoice(
            index=i,
            message=assistant_message(g, plan.single_tool_call),
            finish_reason=finish_reason(g.finish_reason, g),  # type: ignore[arg-type]
            proxyalign=provenance_of(g, criterion) if plan.provenance else None,
        )
        for i, g in enumerate(generations)
    ]
    return ChatCompletion(model=model, choices=choices, usage=usage_of(generations, plan.n))


def completion_reply(generations: list[Generation], plan: Plan, criterion: str, model: str) -> Completion:
    """A non-streamed text completion answer."""
    choices = [
        CompletionChoice(
            index=i,
            text=g.text,
            finish_reason=finish_reason(g.finish_reason),  # type: ignore[arg-type]
            proxyalign=provenance_of(g, criterion) if plan.provenance else None,
        )
        for i, g in enumerate(generations)
    ]
    return Completion(model=model, choices=choices, usage=usage_of(generations, plan.n))


def create_app(aligner: Any, config: ServerConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``aligner``. The caller owns the aligner (and closes it); on
    shutdown the app refuses new requests (503) and lets running ones finish for ``config.drain_s``."""
    config = config or ServerConfig()
    metrics = ServerMetrics(aligner)
    service = GenerationService(aligner, config, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.drain(config.drain_s)

    app = FastAPI(
        title="proxyalign",
        summary="A large base model and a small aligned model decoding together, behind OpenAI's API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.config = config
    install_error_handlers(app, config.retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(ResponseCounter, metrics=metrics)
    authorized = [Depends(api_key_check(config.key_bytes()))]
    v1 = APIRouter(prefix="/v1", dependencies=authorized)

    def criterion_name(plan: Plan) -> str:
        options = plan.options
        chosen = aligner.resolve_criterion(
            options.get("criterion"), options.get("criterion_params"), options.get("mode")
        )
        return chosen.name

    def model_card() -> ModelCard:
        details = {"models": dict(aligner.names), "criterion": aligner.criterion.name}
        details["criterion_params"] = dict(aligner.criterion.params)
        return ModelCard(id=config.model_name, proxyalign=details)

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def respond(request: Request, tracker: Tracker, plan: Plan, kind: str) -> Response:
        """Run the plan: a stream of server-sent events, or one JSON answer once every choice is done."""
        criterion = criterion_name(plan)
        if plan.stream:
            stream = await service.open(plan, tracker)
            events = chat_events if kind == "chat" else completion_events
            body = events(plan, tracker, stream, config.model_name, criterion)
            return EventStreamResponse(body, on_close=lambda: tracker.finish("disconnected"))
        try:
            generations = await until_disconnected(request, service.generate(plan, tracker))
        except ClientDisconnected:
            tracker.finish("disconnected")
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        tracker.finish("success")
        build = chat_reply if kind == "chat" else completion_reply
        return JSONResponse(build(generations, plan, criterion, config.model_name).model_dump(mode="json"))

    async def guarded(endpoint: str, answer: Callable[[Tracker], Awaitable[Response]]) -> Response:
        tracker = service.track(endpoint)
        try:
            return await answer(tracker)
        except ProxyAlignError as exc:
            error = proxyalign_error(exc, retry_after_s=config.retry_after_s)
            tracker.fail(error)
            raise error from None
        except asyncio.CancelledError:  # the server cancelled it (shutdown after the drain time)
            tracker.finish("disconnected")
            raise
        except BaseException as exc:
            tracker.fail(exc)
            raise

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @v1.get("/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return model_card()

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        async def answer(tracker: Tracker) -> Response:
            check_model(body.model)
            plan = plan_chat(body, config)
            return await respond(request, tracker, plan, "chat")

        return await guarded("chat", answer)

    @v1.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        async def answer(tracker: Tracker) -> Response:
            check_model(body.model)
            plan = plan_completion(body, config)
            return await respond(request, tracker, plan, "completion")

        return await guarded("completion", answer)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = aligner.status()
        body = {
            "status": "draining" if service.draining else "ok",
            "running": status["running"],
            "waiting": status["waiting"],
        }
        headers = {"Retry-After": str(config.retry_after_s)} if service.draining else None
        return JSONResponse(body, status_code=503 if service.draining else 200, headers=headers)

    @app.get("/metrics", dependencies=authorized)
    async def prometheus_metrics() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    app.include_router(v1)
    return app

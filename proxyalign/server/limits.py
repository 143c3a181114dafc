"""The request-body limit, as a small ASGI middleware (before any JSON is parsed).

A declared ``Content-Length`` over the limit is answered 413 at once; a chunked body is counted as it
arrives and refused as soon as it passes the limit, so a large upload never sits in memory.
"""

from __future__ import annotations

from fastapi import HTTPException  # a subclass of Starlette's: both kinds of handler let it through
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxyalign.server.errors import APIError, error_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(APIError(400, "Content-Length is not a number"))(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await error_response(APIError(413, self._too_large(), code="body_too_large"))(
                    scope, receive, send
                )
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # an HTTPException is what the framework lets through a body read unchanged
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited, send)

"""OpenAI-shaped error JSON for every failure, and the exception handlers that produce it.

Clients of OpenAI-compatible servers read ``{"error": {"message", "type", "param", "code"}}``; the SDKs
turn it into typed exceptions (``BadRequestError``, ``AuthenticationError`` ...). Whatever goes wrong, a
client gets that shape and a message naming the field at fault, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxyalign.errors import CriterionError, EngineClosedError, ProxyAlignError

__all__ = ["APIError", "error_body", "error_response", "install_error_handlers", "proxyalign_error"]

logger = logging.getLogger("proxyalign.server")

#: The OpenAI error ``type`` of each status.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server refuses, with its status, OpenAI error fields and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error, as OpenAI's API writes it."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


def proxyalign_error(
    exc: ProxyAlignError, *, retry_after_s: int = 1, prompt_field: str = "prompt"
) -> APIError:
    """A proxyalign exception as an API error: bad input is 400, a closed engine 503, a failing criterion
    500 (a server-side component broke, not the request), each with proxyalign's own message (which
    names the parameter). ``prompt_field``: the request field a prompt problem is about (``messages``
    in chat)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, EngineClosedError):
        return APIError(
            503, f"the server is shutting down: {message}", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(exc, CriterionError):
        return APIError(500, message, param="criterion", code="criterion_error")
    param = _param_of(message)
    return APIError(400, message, param=prompt_field if param == "prompt" else param)


#: proxyalign option names and the request fields they come from, for the ``param`` of an error.
_PARAMS: dict[str, str] = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "criterion_params": "criterion_params",
    "criterion_on": "criterion_on",
    "criterion": "criterion",
    "mode": "mode",
    "gamma": "gamma",
    "response_format": "response_format",
    "tool_choice": "tool_choice",
    "tools": "tools",
}


def _param_of(message: str) -> str | None:
    """The request field a proxyalign message starts with, if any (its messages name the option first)."""
    if message.startswith("criterion '") and "parameter" in message:
        return "criterion_params"  # "criterion 'dual_kad': parameter 'threshold' must be ..."
    for option, field in _PARAMS.items():
        if message.startswith(option):
            return field
    if message.startswith(("the prompt", "prompt ")):
        return "prompt"
    if message.startswith("unknown criterion") or "criterion" in message.split(":")[0]:
        return "criterion"
    return None


def _location(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "content")`` as ``messages[0].content``."""
    text = ""
    for part in loc:
        if part == "body" and not text:
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's complaint about a request body: malformed JSON is 400, a well-formed body of the wrong
    shape 422; the message names every field at fault."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")
    parts, first = [], None
    for item in errors:
        field = _location(item.get("loc", ()))
        first = first or field
        if item.get("type") == "missing":
            parts.append(f"{field}: a required field is missing")
        else:
            parts.append(f"{field}: {item.get('msg', 'invalid value')}")
    return APIError(422, "; ".join(parts) or "invalid request body", param=first)


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Every error path answers with OpenAI-shaped JSON; an unexpected exception is logged here (with its
    traceback) and the client gets a 500 without one."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; the API lives under /v1 (see GET /v1/models)"
        headers = dict(exc.headers or {})
        return error_response(APIError(exc.status_code, message, headers=headers))

    async def on_proxyalign(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProxyAlignError)
        return error_response(proxyalign_error(exc, retry_after_s=retry_after_s))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error; the server log has the details"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ProxyAlignError, on_proxyalign)
    app.add_exception_handler(Exception, on_unexpected)

"""The optional bearer API key, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request

from proxyalign.server.errors import APIError

__all__ = ["api_key_check"]


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps even the key's length out of the timing.
    return hashlib.sha256(value).digest()


def api_key_check(key: bytes | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: with a key, every request must send ``Authorization: Bearer KEY`` (401
    otherwise); without one, it lets everything through."""
    expected = None if key is None else _digest(key)

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = _digest(token.strip().encode()) if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, expected):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check

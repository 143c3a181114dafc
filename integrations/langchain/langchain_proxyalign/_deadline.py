"""Time limits on engine calls (``timeout``): past one, the row is aborted and TimeoutError raised.

The limit bounds the request itself, from submission to its last token, whatever the consumer of a
stream does meanwhile. The engine aborts a row when its async call is cancelled; a sync call blocked on
the engine cannot be, so sync calls with a limit wait on the engine's async API through a private event
loop in a daemon thread (started on the first such call, shared by all).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import aclosing
from typing import Any, TypeVar

__all__ = ["abounded", "astream", "stream", "timeout_error"]

T = TypeVar("T")
_LOOP: asyncio.AbstractEventLoop | None = None
_LOCK = threading.Lock()


def timeout_error(owner: str, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"{owner}: the generation took longer than timeout={timeout:g} s and was aborted; raise timeout "
        "(seconds), lower max_tokens, or set timeout=None for no limit"
    )


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="langchain-proxyalign-deadlines")
            thread.daemon = True
            thread.start()
            _LOOP = loop
    return _LOOP


async def abounded(call: Coroutine[Any, Any, T], timeout: float, owner: str) -> T:
    """Await ``call``, cancelling it (which aborts its rows) after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError:
        raise timeout_error(owner, timeout) from None


async def _pump(
    items: AsyncIterator[T], timeout: float, owner: str, put: Callable[[tuple[bool, Any]], None]
) -> None:
    """Hand a stream's items to ``put`` as ``(True, item)``; then ``(False, None)`` at its end, or
    ``(False, error)`` when it fails or runs out of time (the stream is closed: its rows aborted)."""
    try:
        async with asyncio.timeout(timeout), aclosing(items):  # type: ignore[type-var]
            async for item in items:
                put((True, item))
    except TimeoutError:
        put((False, timeout_error(owner, timeout)))
    except Exception as exc:
        put((False, exc))
    else:
        put((False, None))


def stream(make_items: Callable[[], AsyncIterator[T]], timeout: float, owner: str) -> Iterator[T]:
    """An async stream read from sync code, within ``timeout``; closing this iterator aborts it."""
    items: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    future = asyncio.run_coroutine_threadsafe(_pump(make_items(), timeout, owner, items.put), _loop())
    try:
        while True:
            ok, item = items.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        future.cancel()


async def astream(items: AsyncIterator[T], timeout: float, owner: str) -> AsyncIterator[T]:
    """An async stream within ``timeout``; closing this iterator aborts it."""
    received: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    pump = asyncio.ensure_future(_pump(items, timeout, owner, received.put_nowait))
    try:
        while True:
            ok, item = await received.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        pump.cancel()

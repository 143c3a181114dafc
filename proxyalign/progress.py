"""A live line while the engine decodes: tokens generated, rows finished, tokens/s (on stderr).

A batch of long answers can take minutes on a CPU with nothing to show until the first row finishes;
:class:`DecodeProgress` polls the engine's running totals (``aligner.status()``, a cheap snapshot) on a
thread of its own and redraws one tqdm line about once a second, so a front end (the demo, ``proxyalign
generate``, the evaluation) says what it is doing without touching the decoding loop.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Any

__all__ = ["DecodeProgress", "decoded_tokens"]


def decoded_tokens(aligner: Any) -> int:
    """Tokens the aligner's engine has produced so far, over every request (0 if it cannot say)."""
    status = getattr(aligner, "status", None)
    if status is None:
        return 0
    return int(status().get("totals", {}).get("decoded_tokens", 0))


class DecodeProgress:
    """``with DecodeProgress(aligner, rows=8, desc="p alone"):`` around a blocking decode. Rows count as
    finished from the engine's totals, so other callers' rows decoding at the same time count too (the
    line says what the engine does, which is what a waiting user wants to know).

    ``bar``: a tqdm bar the caller already keeps (the evaluation's questions bar); the tokens and
    tokens/s then go into its postfix and the caller keeps counting its own units."""

    def __init__(
        self,
        aligner: Any,
        rows: int = 0,
        desc: str = "decoding",
        *,
        enabled: bool = True,
        interval_s: float = 1.0,
        bar: Any = None,
    ) -> None:
        self.aligner, self.rows, self.desc = aligner, rows, desc
        self.enabled = enabled and getattr(aligner, "status", None) is not None
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = bar
        self._own_bar = bar is None
        self.label = ""  #: shown before the figures (the evaluation sets it to the method last finished)

    def _totals(self) -> tuple[int, int]:
        totals = self.aligner.status().get("totals", {})
        return int(totals.get("decoded_tokens", 0)), int(totals.get("finished", 0))

    def __enter__(self) -> DecodeProgress:
        if not self.enabled:
            return self
        from tqdm.auto import tqdm

        self._start_tokens, self._start_rows = self._totals()
        self._started = time.perf_counter()
        if self._own_bar:
            self._bar = tqdm(
                total=self.rows, desc=self.desc, unit="row", file=sys.stderr, leave=False, dynamic_ncols=True
            )
        self._thread = threading.Thread(target=self._poll, name="proxyalign-progress", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._draw()

    def _draw(self) -> None:
        tokens, rows = self._totals()
        tokens -= self._start_tokens
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        if self._own_bar:
            self._bar.n = min(rows - self._start_rows, self.rows)
        label = f"{self.label}, " if self.label else ""
        self._bar.set_postfix_str(f"{label}{tokens} tokens, {tokens / elapsed:.1f} tok/s", refresh=False)
        self._bar.refresh()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if self._own_bar:
            self._bar.close()

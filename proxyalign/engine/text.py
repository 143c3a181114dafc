"""Incremental detokenization with multi-token stop strings and streaming hold-back.

transformers' ``stop_strings`` leaves the stop text in and crashes on some tokenizers, so we cut stop
strings ourselves on the decoded text: a stop string may span several tokens, and while streaming we
hold back the tail that could still turn out to be the start of one.

Decoding is incremental: each new token decodes a short window (the tokens since the text last grew,
plus those of the step before, so a tokenizer that renders a token by its left neighbour, such as
SentencePiece's leading space, sees the same context as in a full decode) instead of the whole row,
which made a row of n tokens cost O(n^2) in the engine's thread, between forwards: with Qwen's
tokenizer 0.79 ms per token at 4096 tokens, 50 ms per step for 64 such rows, against 0.006 ms
windowed (``benchmarks/detokenize.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextAccumulator"]

_REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to


class TextAccumulator:
    """Decoded text of one row, with stop-string detection and safe-to-emit deltas."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stop_sequence: str | None = None
        # decode(ids[:read]) == _complete; decode(ids[prefix:read]) == _window_text; prefix < read
        # unless read == 0. Both offsets sit where the text had no incomplete character at its end.
        self._prefix = self._read = 0
        self._complete = self._window_text = ""

    @property
    def text(self) -> str:
        """The text so far (final text once stopped: the stop string and what follows are cut)."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_sequence is not None

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text that is now safe to emit (may be empty)."""
        if self.stopped:
            raise RuntimeError("add() after a stop string was found")
        self._ids.extend(token_ids)
        stable = self._decode_new().rstrip(_REPLACEMENT)
        search_from = max(0, len(self._text) - self._holdback)
        self._text = stable
        cut = self._find_stop(search_from)
        if cut is not None:
            return self._release(len(self._text))
        return self._release(max(self._emitted, len(self._text) - self._holdback))

    def finish(self) -> str:
        """Release everything still held back (the row ended without a stop string)."""
        if not self.stopped:
            self._text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        return self._release(len(self._text))

    def _decode_new(self) -> str:
        """The whole row's text (an incomplete last character may show as U+FFFD), decoding only the
        window since ``_prefix``; falls back to one full decode where the window's text does not extend
        what it rendered before (a decoder that rewrites earlier text by what follows)."""
        window = self._tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if window.startswith(self._window_text):
            decoded = self._complete + window[len(self._window_text) :]
        else:
            decoded = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if len(decoded) > len(self._complete) and not decoded.endswith(_REPLACEMENT):
            prefix = self._read
            self._prefix, self._read, self._complete = prefix, len(self._ids), decoded
            self._window_text = self._tokenizer.decode(self._ids[prefix:], skip_special_tokens=True)
        return decoded

    def _find_stop(self, start: int) -> int | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self._text = self._text[: best[0]]
        self.stop_sequence = best[1]
        return best[0]

    def _release(self, upto: int) -> str:
        upto = min(upto, len(self._text))
        if upto <= self._emitted:
            return ""
        piece = self._text[self._emitted : upto]
        self._emitted = upto
        return piece

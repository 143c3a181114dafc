"""The generation loop shared by every decoding mode: rows, EOS, stop strings, limits, statistics.

A *decoder* (token-level or speculative) produces a :class:`StepResult` per step: zero or more new
tokens per row. This loop turns them into per-row text, provenance and stats, and yields a chunk per
row and step so that ``generate`` and ``stream`` share one code path.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxyalign.engine.results import (
    SOURCE_CODES,
    FinishReason,
    Generation,
    GenerationChunk,
    GenerationStats,
    Source,
)
from proxyalign.engine.text import TextAccumulator
from proxyalign.engine.token_level import StepResult

__all__ = ["Decoder", "run_loop"]


class Decoder(Protocol):
    """Anything that advances every row of a batch by one step."""

    def step(self) -> StepResult: ...

    def forward_counts(self) -> tuple[int, int]:
        """(forward passes of p, forward passes of q*) so far."""
        ...

    def retain(self, rows: Sequence[int]) -> None:
        """Go on with only these rows of the current batch, in this order (the others finished)."""
        ...


@dataclass
class _Row:
    text: TextAccumulator
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    finish_reason: FinishReason | None = None


def run_loop(
    decoder: Decoder,
    tokenizer: Any,
    prompt_tokens: Sequence[int],
    max_new_tokens: int,
    eos_ids: Collection[int],
    stop: Sequence[str] = (),
) -> Iterator[GenerationChunk]:
    """Drive ``decoder`` until every row has finished; yield a chunk per row that made progress.

    Rows leave the decoder's batch as soon as they finish, so the batch shrinks to the rows still
    decoding; ``active[slot]`` is the caller's index of the decoder's row ``slot``.
    """
    rows = [_Row(TextAccumulator(tokenizer, stop), GenerationStats(prompt_tokens=n)) for n in prompt_tokens]
    active = list(range(len(rows)))
    start = time.perf_counter()
    while active:
        result = decoder.step()
        now = time.perf_counter() - start
        for slot, index in enumerate(active):
            row = rows[index]
            chunk = _advance(row, index, slot, result, max_new_tokens, eos_ids)
            if row.finish_reason is not None:
                row.stats.elapsed_s = now
                row.stats.base_forwards, row.stats.aligned_forwards = decoder.forward_counts()
                chunk.generation = Generation(
                    text=row.text.text,
                    token_ids=row.token_ids,
                    sources=row.sources,
                    finish_reason=row.finish_reason,
                    stop_sequence=row.text.stop_sequence,
                    stats=row.stats,
                )
            if chunk.token_ids or chunk.text or chunk.finish_reason:
                yield chunk
        going = [slot for slot, index in enumerate(active) if rows[index].finish_reason is None]
        if going and len(going) < len(active):
            decoder.retain(going)
        active = [active[slot] for slot in going]


def _advance(
    row: _Row, index: int, slot: int, result: StepResult, max_new_tokens: int, eos_ids: Collection[int]
) -> GenerationChunk:
    """Append this step's tokens of one row (the decoder's row ``slot``), stopping at EOS, a stop
    string or the length limit."""
    stats = row.stats
    stats.drafts += result.drafted[slot]
    stats.rejected_drafts += result.rejected[slot]
    stats.pgm_checks += result.pgm_checked[slot]
    stats.pgm_holds += result.pgm_holds[slot]
    chunk = GenerationChunk(index=index, text="", token_ids=[], sources=[])
    for token, code in zip(result.tokens[slot], result.sources[slot], strict=True):
        source = SOURCE_CODES[code]
        row.token_ids.append(token)
        row.sources.append(source)
        chunk.token_ids.append(token)
        chunk.sources.append(source)
        stats.new_tokens += 1
        _count_source(stats, source)
        if token in eos_ids:
            row.finish_reason = FinishReason.EOS
            chunk.text += row.text.finish()
            break
        chunk.text += row.text.add([token])
        if row.text.stopped:
            row.finish_reason = FinishReason.STOP
            break
        if stats.new_tokens >= max_new_tokens:
            row.finish_reason = FinishReason.LENGTH
            chunk.text += row.text.finish()
            break
    chunk.finish_reason = row.finish_reason
    return chunk


def _count_source(stats: GenerationStats, source: Source) -> None:
    if source is Source.BASE:
        stats.tokens_from_base += 1
    elif source is Source.ALIGNED:
        stats.tokens_from_aligned += 1
    else:
        stats.tokens_from_target += 1

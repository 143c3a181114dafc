"""One request's output as it grows: text with stop strings, provenance, finish reason, statistics.

A lane reports each step's tokens per row (:class:`~proxyalign.engine.lanes.RowStep`); this turns them
into the caller's :class:`GenerationChunk` stream, stopping at EOS, a stop string or the length limit
(tokens a speculative round produced past that point are dropped), and into the final
:class:`Generation`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from proxyalign.engine.lanes import RowStep
from proxyalign.engine.request import Request
from proxyalign.engine.results import (
    SOURCE_CODES,
    FinishReason,
    Generation,
    GenerationChunk,
    GenerationStats,
    Source,
)
from proxyalign.engine.text import TextAccumulator

__all__ = ["RowOutput"]


class RowOutput:
    """The output of one request so far."""

    def __init__(self, request: Request, tokenizer: Any, eos_ids: Collection[int]) -> None:
        self.request = request
        self.eos_ids = eos_ids
        self.text = TextAccumulator(tokenizer, request.stop)
        self.stats = GenerationStats(prompt_tokens=request.prompt_tokens)
        self.token_ids: list[int] = []
        self.sources: list[Source] = []
        self.finish_reason: FinishReason | None = None
        tools = request.tools
        self.tool_stream = tools.parser.stream(tools=tools.names, seed=tools.seed) if tools else None

    def advance(self, step: RowStep, elapsed: float) -> GenerationChunk:
        """Append one step's tokens (``elapsed``: seconds since submission); the chunk of new text."""
        stats = self.stats
        stats.drafts += step.drafted
        stats.rejected_drafts += step.rejected
        stats.pgm_checks += step.pgm_checked
        stats.pgm_holds += step.pgm_holds
        if step.choice is not None:
            stats.choices[step.choice.label] = stats.choices.get(step.choice.label, 0) + 1
            stats.choice_reason = step.choice.reason
        if stats.first_token_s is None and step.tokens:
            stats.first_token_s = elapsed
        chunk = GenerationChunk(index=self.request.index, text="", token_ids=[], sources=[])
        for token, code in zip(step.tokens, step.codes, strict=True):
            source = SOURCE_CODES[code]
            self.token_ids.append(token)
            self.sources.append(source)
            chunk.token_ids.append(token)
            chunk.sources.append(source)
            stats.new_tokens += 1
            _count_source(stats, source)
            if token in self.eos_ids:
                self.finish_reason = FinishReason.EOS
                chunk.text += self.text.finish()
                break
            chunk.text += self.text.add([token])
            if self.text.stopped:
                self.finish_reason = FinishReason.STOP
                break
            if stats.new_tokens >= self.request.max_new_tokens:
                self.finish_reason = FinishReason.LENGTH
                chunk.text += self.text.finish()
                break
        chunk.finish_reason = self.finish_reason
        self._split_tool_calls(chunk)
        return chunk

    def _split_tool_calls(self, chunk: GenerationChunk) -> None:
        """Set the chunk's ``content`` and ``tool_calls`` (with tools: what the stream parser releases)."""
        if self.tool_stream is None:
            chunk.content = chunk.text
            return
        parts = [self.tool_stream.feed(chunk.text) if chunk.text else None]
        if self.finish_reason is not None:
            parts.append(self.tool_stream.finish())
        chunk.content = "".join(part.content for part in parts if part)
        chunk.tool_calls = [call for part in parts if part for call in part.tool_calls]

    def generation(self, elapsed: float, forwards: tuple[int, int]) -> Generation:
        """The finished :class:`Generation`; ``forwards``: (p, q*) passes this row took part in."""
        self.stats.elapsed_s = elapsed
        self.stats.base_forwards, self.stats.aligned_forwards = forwards
        assert self.finish_reason is not None
        parsed = self.tool_stream.output if self.tool_stream is not None else None
        return Generation(
            text=self.text.text,
            token_ids=self.token_ids,
            sources=self.sources,
            finish_reason=self.finish_reason,
            stop_sequence=self.text.stop_sequence,
            stats=self.stats,
            content=parsed.content if parsed is not None else None,
            tool_calls=list(parsed.tool_calls) if parsed is not None else [],
            tool_call_errors=list(parsed.errors) if parsed is not None else [],
        )


def _count_source(stats: GenerationStats, source: Source) -> None:
    if source is Source.BASE:
        stats.tokens_from_base += 1
    elif source is Source.ALIGNED:
        stats.tokens_from_aligned += 1
    else:
        stats.tokens_from_target += 1

"""What a generation call returns: text, token ids, per-token provenance and statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from proxyalign.tools.types import ToolCall, ToolCallDelta, ToolCallIssue

__all__ = ["FinishReason", "Generation", "GenerationChunk", "GenerationStats", "Source"]


class Source(StrEnum):
    """Which distribution produced a token."""

    BASE = "base"  #: p's draft, kept
    ALIGNED = "aligned"  #: q*'s sample after p's draft was rejected
    TARGET = "target"  #: drawn from the combined target directly (no PGM decomposition existed)
    RESIDUAL = "residual"  #: speculative mode: drawn from norm(max(0, pi - q*)) after q*'s draft was rejected
    BONUS = "bonus"  #: speculative mode: drawn from pi after all of q*'s drafts of a round were accepted


#: Integer codes used on the device; index into this tuple to get the :class:`Source`.
SOURCE_CODES: tuple[Source, ...] = (Source.BASE, Source.ALIGNED, Source.TARGET, Source.RESIDUAL, Source.BONUS)
#: The device code of each :class:`Source` (the inverse of :data:`SOURCE_CODES`).
CODE: dict[Source, int] = {source: code for code, source in enumerate(SOURCE_CODES)}


class FinishReason(StrEnum):
    EOS = "eos"  #: an end-of-sequence token of either model
    STOP = "stop"  #: a stop string appeared (cut from the text)
    LENGTH = "length"  #: max_new_tokens reached


@dataclass
class GenerationStats:
    """Per-row statistics. Rates are fractions in [0, 1]; ``None`` where undefined.

    In speculative modes a *draft* is one of q*'s drafted tokens that p checked (accepted, or the one
    rejected that ends a round; drafts after a rejection are discarded unchecked), so
    ``acceptance_rate`` is the per-draft acceptance probability of speculative sampling; one round costs
    one forward pass of p, so ``base_forwards`` counts rounds; residual and bonus tokens count in
    ``tokens_from_target``.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_from_base: int = 0
    tokens_from_aligned: int = 0
    tokens_from_target: int = 0
    drafts: int = 0  #: tokens for which p proposed a draft (speculative: q*'s drafts that p checked)
    rejected_drafts: int = 0
    pgm_checks: int = 0  #: steps of a target-defined criterion
    pgm_holds: int = 0  #: of which the target was a rejection PGM
    elapsed_s: float = 0.0  #: from submission to the last token (queueing and prefill included)
    queued_s: float = 0.0  #: waiting for a place in the running batch
    first_token_s: float | None = None  #: from submission to the first new token
    base_forwards: int = 0  #: forward passes of p this row took part in (shared with its batch)
    aligned_forwards: int = 0  #: forward passes of q* this row took part in (shared with its batch)
    #: mode="auto": the lane's steps this row took part in, by choice ("token", "gamma 4", ...)
    choices: dict[str, int] = field(default_factory=dict)
    choice_reason: str | None = None  #: mode="auto": why the last of those steps was chosen

    @property
    def rejection_rate(self) -> float | None:
        """Fraction of p's drafts that the criterion rejected."""
        return self.rejected_drafts / self.drafts if self.drafts else None

    @property
    def pgm_condition_rate(self) -> float | None:
        """For target-defined criteria: how often the target was a rejection PGM."""
        return self.pgm_holds / self.pgm_checks if self.pgm_checks else None

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of drafts kept: p's drafts at token level, q*'s checked drafts in speculative modes."""
        return 1.0 - self.rejected_drafts / self.drafts if self.drafts else None

    @property
    def tokens_per_base_forward(self) -> float | None:
        """New tokens per forward pass of p (1 or less at token level, more when speculation pays)."""
        return self.new_tokens / self.base_forwards if self.base_forwards else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            rejection_rate=self.rejection_rate,
            pgm_condition_rate=self.pgm_condition_rate,
            acceptance_rate=self.acceptance_rate,
            tokens_per_base_forward=self.tokens_per_base_forward,
            tokens_per_s=self.tokens_per_s,
        )
        return data


@dataclass
class Generation:
    """One finished completion.

    ``token_ids`` and ``sources`` run in step: ``sources[i]`` says which model produced
    ``token_ids[i]``. They include an EOS token and the tokens of a stop string when those ended the
    generation; ``text`` excludes both.

    With ``tools``, ``tool_calls`` holds the calls parsed from ``text`` and ``content`` the text outside
    them (``tool_call_errors``: blocks that looked like calls but were malformed; their text stays in
    ``content``). Without tools ``content`` is ``text``.
    """

    text: str
    token_ids: list[int]
    sources: list[Source]
    finish_reason: FinishReason
    stop_sequence: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[ToolCallIssue] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.content is None:
            self.content = self.text

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "content": self.content,
            "tool_calls": [call.to_openai() for call in self.tool_calls],
            "tool_call_errors": [issue.message for issue in self.tool_call_errors],
            "token_ids": self.token_ids,
            "sources": [str(s) for s in self.sources],
            "finish_reason": str(self.finish_reason),
            "stop_sequence": self.stop_sequence,
            "stats": self.stats.as_dict(),
        }


@dataclass
class GenerationChunk:
    """A streamed piece of one row's completion.

    ``text`` is the new text since the previous chunk (text that might begin a stop string is held
    back until it is known not to); ``token_ids``/``sources`` are the tokens decoded in this step.
    The last chunk of a row has ``finish_reason`` and the whole ``generation`` set.

    With ``tools``, ``content`` is the new text outside tool calls (text that may begin a call is held
    back) and ``tool_calls`` the calls' pieces in OpenAI's streaming shape; without tools ``content``
    is ``text``.
    """

    index: int
    text: str
    token_ids: list[int]
    sources: list[Source]
    finish_reason: FinishReason | None = None
    generation: Generation | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

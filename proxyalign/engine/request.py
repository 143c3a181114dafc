"""One request as the engine sees it: validated token ids, settings, criterion, seed.

Everything here is checked at the edge (:class:`~proxyalign.ProxyAligner`) before the request reaches
the engine, so the engine never meets a bad value; a request is immutable once submitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from proxyalign.criteria.base import Criterion, CriterionKind
from proxyalign.engine.sampling import SamplingConfig
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE

if TYPE_CHECKING:
    from proxyalign.constrained import Grammar
    from proxyalign.tools import ToolCallParser

__all__ = ["LaneKey", "Request", "ToolParsing", "derive_seed", "lane_key", "roles_for"]

#: How a lane decodes: token by token, exact speculative, the SSS paper's literal rule, or either of the
#: first two chosen per step (``mode="auto"``).
LaneKind = Literal["token", "speculative", "sss_literal", "auto"]
LaneKey = tuple[str, tuple[str, ...]]


def roles_for(criterion: Criterion) -> tuple[str, ...]:
    """The models a criterion needs: q* alone for one that always rejects; p, q* (and q) otherwise."""
    if criterion.kind is CriterionKind.ALIGNED_ONLY:
        return (ALIGNED,)
    return (BASE, ALIGNED, SMALL_BASE) if criterion.needs_small_base else (BASE, ALIGNED)


def lane_key(mode: str, criterion: Criterion) -> LaneKey:
    """Rows that can share forward passes: same decoding kind, same models.

    A criterion that always rejects samples q* alone: speculative decoding has nothing for p to check,
    so such rows decode token by token.
    """
    roles = roles_for(criterion)
    if mode == "token" or criterion.kind is CriterionKind.ALIGNED_ONLY:
        kind = "token"
    elif mode in ("sss_literal", "auto"):
        kind = mode
    else:
        kind = "speculative"
    return kind, roles


def derive_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a call seeded with ``seed``.

    Prompt 0 uses ``seed`` itself, so ``generate(x, seed=s)`` and ``generate([x, ...], seed=s)[0]``
    agree; the others get independent seeds (a hash), so identical prompts in one call differ.
    """
    if index == 0:
        return seed
    digest = hashlib.sha256(f"proxyalign/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class ToolParsing:
    """How to read tool calls out of a request's output: the format's parser, the tool names it may
    call (others stay text), and the seed of its call ids (None: random ids)."""

    parser: ToolCallParser
    names: frozenset[str] | None = None
    seed: int | None = None


@dataclass(frozen=True, eq=False)
class Request:
    """One row to decode: per-model prompt ids and every setting of its own."""

    prompt_ids: Mapping[str, tuple[int, ...]]  #: per model role (only the roles it needs)
    criterion: Criterion
    sampling: SamplingConfig
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    mode: str = "token"  #: "token", "speculative", "sss", "sss_literal" or "auto"
    gamma: int | str = 4
    seed: int | None = None
    index: int = 0  #: the caller's index of this prompt, echoed in its chunks
    grammar: Grammar | None = None  #: every token must keep the output inside this grammar
    tools: ToolParsing | None = None  #: parse tool calls out of the output
    key: LaneKey = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", lane_key(self.mode, self.criterion))

    @property
    def roles(self) -> tuple[str, ...]:
        return self.key[1]

    @property
    def prompt_tokens(self) -> int:
        """Prompt length of the model that leads (p, or q* when it decodes alone), as reported in stats."""
        return len(self.prompt_ids[self.roles[0]])

    @property
    def longest_prompt(self) -> int:
        return max(len(ids) for ids in self.prompt_ids.values())

    @property
    def speculative(self) -> bool:
        return self.key[0] != "token"

    def generator(self) -> torch.Generator:
        """The request's own random stream (CPU, so a seed means the same numbers on any device)."""
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator

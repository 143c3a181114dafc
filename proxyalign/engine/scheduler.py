"""Scheduling policy of the running batch: how many rows, how much prefill per step, how much cache.

Iteration-level scheduling (Orca, OSDI '22): between two decoding steps, waiting requests are admitted
first come, first served while the batch has room; their prompts are prefilled in chunks of at most
``max_prefill_tokens`` per step, so a long newcomer delays the rows already decoding by one chunk per
step, not by its whole prompt; once prefilled they join their lane's caches. A request that could never
fit is refused when it is submitted; one that does not fit *now* waits in the queue (nothing is
dropped), and the queue is never overtaken, so no request starves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from proxyalign.engine.gamma import AUTO_GAMMAS, GammaSchedule
from proxyalign.engine.request import LaneKey, Request
from proxyalign.engine.runner import ModelRunner, keeps_a_hole, left_pad
from proxyalign.errors import InvalidParameterError

__all__ = ["PrefillJob", "SchedulerConfig", "reserved_tokens"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the running batch; the defaults suit one CPU or one GPU with a small pair.

    - ``max_rows``: requests decoding (or prefilling) at once, over all lanes. More rows raise
      throughput until a step becomes compute-bound; on a GPU, 128-256 is usual.
    - ``max_prefill_tokens``: prompt tokens prefilled per model per step (chunked prefill). Smaller keeps
      the running rows' inter-token latency low while newcomers arrive; larger admits them faster.
    - ``max_cached_tokens``: tokens all admitted requests may occupy per model, counted as prompt +
      ``max_new_tokens`` (+ ``gamma + 1`` in speculative modes) each. Bounds KV-cache memory: for a 1.5B
      Qwen2.5 in bfloat16 a token takes 28 KiB, so the default is at most 3.5 GiB. Caches are
      rectangular (rows are left-padded to the longest), so actual use can exceed the count when
      prompt lengths differ widely.
    """

    max_rows: int = 64
    max_prefill_tokens: int = 512
    max_cached_tokens: int = 131_072

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_prefill_tokens", "max_cached_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")


def reserved_tokens(request: Request) -> int:
    """Cache positions a request may occupy per model: its prompt, its new tokens and, in speculative
    modes, one round of drafts beyond them."""
    overshoot = 0
    if request.key[0] == "auto":
        overshoot = max(AUTO_GAMMAS) + 1
    elif request.speculative:
        schedule = GammaSchedule.parse(request.gamma)
        overshoot = (schedule.high if schedule.adaptive else schedule.value) + 1
    return request.longest_prompt + request.max_new_tokens + overshoot


class PrefillJob:
    """Newly admitted requests of one lane, prefilled together, a chunk of columns per step.

    Each model gets the prompts without their last token, left-padded; the last token stays queued, so
    the lane's next step computes the first new token's distribution like any other.
    """

    def __init__(self, key: LaneKey, tickets: Sequence[Any], models: Mapping[str, Any], pad_id: int) -> None:
        self.key = key
        self.tickets = list(tickets)
        self.runners: dict[str, ModelRunner] = {}
        self._last: dict[str, torch.Tensor] = {}
        for role in key[1]:
            model = models[role]
            device = model.get_input_embeddings().weight.device
            prompts = [t.request.prompt_ids[role] for t in self.tickets]
            lead = int(keeps_a_hole(device, len(prompts)))
            ids, mask = left_pad([p[:-1] for p in prompts], pad_id, device, lead=lead)
            self.runners[role] = ModelRunner(model, ids, mask)
            self._last[role] = torch.tensor([p[-1] for p in prompts], dtype=torch.long)

    @property
    def remaining(self) -> int:
        """Columns still to prefill (the widest model's)."""
        return max(runner.lag for runner in self.runners.values())

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def advance(self, budget: int) -> int:
        """Prefill up to ``budget`` tokens per model (at least one column); returns the tokens fed."""
        rows = len(self.tickets)
        columns = min(max(1, budget // max(rows, 1)), self.remaining)
        for runner in self.runners.values():
            runner.feed(columns)
        return columns * rows

    def retain(self, keep: Sequence[int]) -> None:
        """Drop aborted requests before they join."""
        index = torch.tensor(list(keep), dtype=torch.long)
        for role, runner in self.runners.items():
            runner.retain(index)
            self._last[role] = self._last[role].index_select(0, index)
        self.tickets = [self.tickets[i] for i in keep]

    def finish(self) -> dict[str, ModelRunner]:
        """Queue each prompt's last token; the runners are ready to join a lane."""
        for role, runner in self.runners.items():
            runner.push(self._last[role])
        return self.runners

"""The engine driven by hand: for tests that step it, join rows mid-run and inspect caches directly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from proxyalign.engine.auto import AutoPolicy
from proxyalign.engine.core import Engine, make_lane
from proxyalign.engine.lanes import Lane, LaneRow
from proxyalign.engine.request import Request
from proxyalign.engine.scheduler import PrefillJob
from proxyalign.models import context_window

__all__ = ["manual_engine", "prefilled_lane"]


def manual_engine(aligner: Any, **scheduler: int) -> Engine:
    """An engine over ``aligner``'s models that runs only when the test calls ``engine.step()``.

    ``scheduler`` overrides :class:`~proxyalign.engine.scheduler.SchedulerConfig` fields.
    """
    return Engine(
        aligner.models,
        aligner.tokenizer,
        vocab_size=aligner.vocab_size,
        eos_ids=aligner.eos_token_ids,
        pad_id=aligner.pad_token_id,
        windows={role: context_window(model) for role, model in aligner.models.items()},
        config=replace(aligner.engine.config, **scheduler),
        auto_run=False,
    )


def prefilled_lane(aligner: Any, requests: Sequence[Request], policy: AutoPolicy | None = None) -> Lane:
    """A lane holding ``requests`` (from ``aligner.requests(...)``, all of one lane), prefilled at once.

    ``lane.step()`` then advances them as the engine would; ``lane.runners`` are the models' states.
    ``policy`` chooses the steps of a ``mode="auto"`` lane (default: measured costs).
    """
    keys = {request.key for request in requests}
    if len(keys) != 1:
        raise ValueError(f"requests of one lane expected, got {sorted(keys)}")
    (key,) = keys
    tickets = [SimpleNamespace(request=request) for request in requests]
    job = PrefillJob(key, tickets, aligner.models, aligner.pad_token_id)
    while not job.done:
        job.advance(1 << 30)
    windows = {role: context_window(model) for role, model in aligner.models.items()}
    lane = make_lane(key, aligner.models, aligner.vocab_size, aligner.pad_token_id, windows, policy)
    rows = [LaneRow(r, None, r.generator(), r.prompt_tokens) for r in requests]
    lane.join(rows, job.finish())
    return lane

"""One model's decoding state: its KV cache, attention mask and the tokens it has not seen yet.

Every model of the hybrid sees the same generated tokens but may have its own prompt (format), so each
has its own left-padded batch and cache. A runner only runs when its distribution is needed: tokens are
queued with :meth:`ModelRunner.push` and fed in one chunked forward by :meth:`ModelRunner.next_logits`.
That is all the lazy-q* path needs: q*'s runner simply falls behind and catches up on demand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["ModelRunner", "left_pad", "retain_rows"]


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for a batch of token-id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


class ModelRunner:
    """KV-cached incremental forward passes of one causal LM over a left-padded batch."""

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.model = model
        self.device = input_ids.device
        self.cache = DynamicCache(config=model.config)
        self.attention_mask = attention_mask
        self.pending = input_ids
        self.forwards = 0

    @property
    def lag(self) -> int:
        """Number of tokens queued but not yet fed to the model."""
        return self.pending.shape[1]

    def push(self, tokens: torch.Tensor) -> None:
        """Queue one new token per row (``[B]``, any device)."""
        tokens = tokens.to(self.device, non_blocking=True).unsqueeze(-1)
        self.pending = torch.cat([self.pending, tokens], dim=-1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens)], dim=-1)

    def next_logits(self) -> torch.Tensor:
        """Feed the queued tokens and return the logits of the last position (``[B, V_model]``)."""
        return self.last_logits(1)[:, -1, :]

    def retain(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch, in order): finished rows leave the batch.

        A finished row would otherwise stay in every forward (its attention over its cache, its sampling)
        until the slowest row ends, which with long, uneven outputs (evaluation at 512 tokens) is often
        hundreds of steps.
        """
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.pending = self.pending.index_select(0, rows)

    # -- speculative decoding: several tokens per row in, several positions out, per-row rollback ------
    def push_block(self, tokens: torch.Tensor) -> None:
        """Queue several tokens per row (``[B, n]``, any device), e.g. q*'s drafts for p to score."""
        tokens = tokens.to(self.device, non_blocking=True)
        self.pending = torch.cat([self.pending, tokens], dim=-1)
        visible = self.attention_mask.new_ones(tokens.shape)
        self.attention_mask = torch.cat([self.attention_mask, visible], dim=-1)

    @torch.inference_mode()
    def last_logits(self, keep: int) -> torch.Tensor:
        """Feed the queued tokens; logits of the last ``keep`` positions (``[B, keep, V_model]``).

        Position i of the result predicts the token after the ``keep - i``-th last queued token; with the
        drafts queued behind one real token this scores all drafts plus the bonus position at once.
        """
        if not 1 <= keep <= self.lag:
            raise RuntimeError(f"last_logits({keep}) needs between 1 and {self.lag} queued tokens")
        positions = (self.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -self.lag :]
        out = self.model(
            input_ids=self.pending,
            attention_mask=self.attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        self.cache = out.past_key_values
        self.pending = self.pending[:, :0]
        self.forwards += 1
        return out.logits[:, -keep:, :]

    def rewind(self, kept: torch.Tensor, fed: int, kept_max: int) -> None:
        """Forget rejected drafts: of the last ``fed`` cached tokens keep the first ``kept[b]`` of row b.

        Caches stay rectangular: every row is cropped to ``kept_max`` (= ``max(kept)``, known on the
        host), and a row that kept fewer gets holes (attention mask 0) where its rejected drafts were.
        Later positions come from the mask's cumulative sum, so holes are invisible to the model. A crop
        by zero is skipped, not passed on (``crop(-0)`` empties the cache in some transformers versions).
        """
        if self.lag:
            raise RuntimeError("rewind() needs every queued token fed first")
        drop = fed - kept_max
        if drop < 0 or kept_max < 0:
            raise ValueError(f"cannot keep {kept_max} of {fed} fed tokens")
        if drop > 0:
            self.cache.crop(-drop)
            self.attention_mask = self.attention_mask[:, :-drop]
        if kept_max > 0:
            offsets = torch.arange(kept_max, device=self.device)
            tail = (offsets < kept.to(self.device).unsqueeze(-1)).to(self.attention_mask.dtype)
            head = self.attention_mask[:, :-kept_max]
            self.attention_mask = torch.cat([head, self.attention_mask[:, -kept_max:] * tail], dim=-1)


def retain_rows(runners: Mapping[str, ModelRunner], rows: Sequence[int]) -> int:
    """Keep only ``rows`` in every runner's batch (finished rows leave); returns the new batch size."""
    index = torch.tensor(list(rows), dtype=torch.long)
    for runner in runners.values():
        runner.retain(index)
    return len(index)

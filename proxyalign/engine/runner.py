"""One model's decoding state over a running batch: its KV cache, attention mask and queued tokens.

Every model of the hybrid sees the same generated tokens but may have its own prompt (format), so each
has its own left-padded batch and cache. A runner only runs when its distribution is needed: tokens are
queued with :meth:`ModelRunner.push` and fed in one chunked forward by :meth:`ModelRunner.next_logits`
(the lazy-q* path simply lets q*'s runner fall behind and catch up on demand).

The batch changes between steps: :meth:`ModelRunner.join` merges newly prefilled rows into the cache
(both sides left-padded to one width) and :meth:`ModelRunner.retain` drops finished rows and the
padding columns no remaining row needs. Masked positions ("holes": left padding, a newcomer's padding
up to the batch's queue length, rejected speculative drafts) are invisible to the model because
positions come from the mask's cumulative sum.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["ModelRunner", "keeps_a_hole", "left_pad", "retain_rows"]


def keeps_a_hole(device: torch.device | str, rows: int) -> bool:
    """Whether a batch of ``rows`` rows on ``device`` keeps one masked column in front of every row.

    transformers drops an all-ones attention mask (rows of equal length: best-of-n, identical prompts)
    and SDPA's CPU kernel without a mask is slow for decoding batches (measured: p at batch 8 and 800
    cached tokens, 345-473 ms per step without a mask against 282-316 ms with one masked column). One
    masked position per row keeps the mask. A single row is the other way round (p at 300 cached
    tokens: 184 ms per decoding step without a mask, 248 ms with one; verifying 5 drafts 204 vs 244 ms),
    so it keeps no hole. GPUs keep the fast unmasked path.
    """
    return rows > 1 and torch.device(device).type == "cpu"


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str, lead: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for a batch of token-id lists (may be empty),
    with ``lead`` more masked columns in front of the longest."""
    width = max((len(s) for s in sequences), default=0) + lead
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@functools.cache
def _cache_argument_of(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_argument(model: Any) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; earlier 5.x only know the former."""
    return _cache_argument_of(type(model).forward)


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer ``(keys, values)`` of shape ``[B, H, T, D]``, or None where nothing is cached yet."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                "continuous batching needs full-attention KV caches; this model has sliding-window layers"
            )
        keys = layer.keys if layer.is_initialized else None
        if keys is None or keys.numel() == 0:
            out.append(None)
        else:
            out.append((keys, layer.values))
    return out


def _pad_kv(
    kv: tuple[torch.Tensor, torch.Tensor] | None,
    like: tuple[torch.Tensor, torch.Tensor],
    rows: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv`` left-padded with zeros to ``width`` positions (``rows`` rows of zeros where it is None)."""
    if kv is None:
        shape = (rows, like[0].shape[1], width, like[0].shape[3])
        zeros = like[0].new_zeros(shape)
        return zeros, zeros.clone()
    missing = width - kv[0].shape[2]
    if missing == 0:
        return kv
    pad = kv[0].new_zeros((kv[0].shape[0], kv[0].shape[1], missing, kv[0].shape[3]))
    return torch.cat([pad, kv[0]], dim=2), torch.cat([pad, kv[1]], dim=2)


class ModelRunner:
    """KV-cached incremental forward passes of one causal LM over a left-padded, changing batch."""

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Rows whose tokens ``input_ids`` (``[B, W]``, left-padded) are all queued, none cached."""
        self.model = model
        self.device = input_ids.device
        self.cache = DynamicCache(config=model.config)
        self.attention_mask = attention_mask
        self.pending = input_ids
        self.forwards = 0

    @property
    def rows(self) -> int:
        return self.pending.shape[0]

    @property
    def lag(self) -> int:
        """Number of tokens queued but not yet fed to the model."""
        return self.pending.shape[1]

    @property
    def cached(self) -> int:
        """Positions in the cache (every row has the same number; some are holes)."""
        return self.attention_mask.shape[1] - self.lag

    def push(self, tokens: torch.Tensor) -> None:
        """Queue one new token per row (``[B]``, any device)."""
        self.push_block(tokens.unsqueeze(-1))

    def push_block(self, tokens: torch.Tensor) -> None:
        """Queue several tokens per row (``[B, n]``, any device), e.g. q*'s drafts for p to score."""
        tokens = tokens.to(self.device, non_blocking=True)
        self.pending = torch.cat([self.pending, tokens], dim=-1)
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones(tokens.shape)], dim=-1
        )

    def next_logits(self) -> torch.Tensor:
        """Feed the queued tokens and return the logits of the last position (``[B, V_model]``)."""
        return self.last_logits(1)[:, -1, :]

    @torch.inference_mode()
    def last_logits(self, keep: int) -> torch.Tensor:
        """Feed the queued tokens; logits of the last ``keep`` positions (``[B, keep, V_model]``).

        Position i of the result predicts the token after the ``keep - i``-th last queued token; with the
        drafts queued behind one real token this scores all drafts plus the bonus position at once.
        """
        if not 1 <= keep <= self.lag:
            raise RuntimeError(f"last_logits({keep}) needs between 1 and {self.lag} queued tokens")
        return self._forward(self.lag, keep)

    @torch.inference_mode()
    def feed(self, columns: int) -> None:
        """Feed the first ``columns`` queued tokens without asking for logits (chunked prefill); a runner
        with nothing queued (its prompt is shorter than another model's) does nothing."""
        columns = min(columns, self.lag)
        if columns > 0:
            self._forward(columns, 1)

    def _forward(self, columns: int, keep: int) -> torch.Tensor:
        start = self.cached
        mask = self.attention_mask[:, : start + columns]
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, start:]
        out = self.model(
            input_ids=self.pending[:, :columns],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{_cache_argument(self.model): self.cache},
        )
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        self.pending = self.pending[:, columns:]
        self.forwards += 1
        return out.logits[:, -keep:, :]

    # -- the batch changes between steps ---------------------------------------------------------
    def join(self, other: ModelRunner, pad_id: int) -> None:
        """Append ``other``'s rows (already prefilled) to this batch: caches and masks are left-padded to
        one width, queues to one length (the shorter queue is padded with holes in front)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.attention_mask, self.pending = other.cache, other.attention_mask, other.pending
            return
        lag = max(self.lag, other.lag)
        mine, theirs = self._split(lag, pad_id), other._split(lag, pad_id)
        width = max(self.cached, other.cached)
        layers = []
        for a, b in zip(_kv(self.cache), _kv(other.cache), strict=True):
            like = a if a is not None else b
            if like is None:
                layers.append((None, None))
                continue
            ka, va = _pad_kv(a, like, self.rows, width)
            kb, vb = _pad_kv(b, like, other.rows, width)
            layers.append((torch.cat([ka, kb]), torch.cat([va, vb])))
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        masks, queues = [], []
        for cached_mask, queue, queue_mask in (mine, theirs):
            pad = cached_mask.new_zeros((cached_mask.shape[0], width - cached_mask.shape[1]))
            masks.append(torch.cat([pad, cached_mask, queue_mask], dim=-1))
            queues.append(queue)
        self.attention_mask = torch.cat(masks)
        self.pending = torch.cat(queues)
        if keeps_a_hole(self.device, self.rows) and bool(self.attention_mask.all()):
            self._prepend_hole()

    def _split(self, lag: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask of the cached part, queue padded in front to ``lag`` tokens, the queue's mask)."""
        cached_mask = self.attention_mask[:, : self.cached]
        queue_mask = self.attention_mask[:, self.cached :]
        extra = lag - self.lag
        if extra:
            holes = self.pending.new_full((self.rows, extra), pad_id)
            return (
                cached_mask,
                torch.cat([holes, self.pending], dim=-1),
                torch.cat([queue_mask.new_zeros((self.rows, extra)), queue_mask], dim=-1),
            )
        return cached_mask, self.pending, queue_mask

    def retain(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch, in order): finished and aborted rows leave.

        A finished row would otherwise stay in every forward (its attention over its cache, its sampling)
        until the slowest row ends. Leading cache columns that no remaining row attends to (the padding
        of a long row that left) are dropped too.
        """
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.pending = self.pending.index_select(0, rows)
        if self.rows and self.cached:
            used = self.attention_mask[:, : self.cached].any(dim=0).nonzero()
            start = int(used[0]) if used.numel() else self.cached
            start -= min(start, int(keeps_a_hole(self.device, self.rows)))
            if start:
                self._drop_leading(start)

    def _prepend_hole(self) -> None:
        """One masked column in front of every row (see :func:`keeps_a_hole`)."""
        layers = []
        for kv in _kv(self.cache):
            if kv is None:
                layers.append((None, None))
                continue
            pad = kv[0].new_zeros((*kv[0].shape[:2], 1, kv[0].shape[3]))
            layers.append((torch.cat([pad, kv[0]], dim=2), torch.cat([pad, kv[1]], dim=2)))
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        hole = self.attention_mask.new_zeros((self.rows, 1))
        self.attention_mask = torch.cat([hole, self.attention_mask], dim=-1)

    def _drop_leading(self, columns: int) -> None:
        layers = [
            (None, None) if kv is None else (kv[0][:, :, columns:], kv[1][:, :, columns:])
            for kv in _kv(self.cache)
        ]
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self.attention_mask = self.attention_mask[:, columns:]

    # -- speculative decoding: per-row rollback ---------------------------------------------------------
    def rewind(self, kept: torch.Tensor, fed: int, kept_max: int) -> None:
        """Forget rejected drafts: of the last ``fed`` cached tokens keep the first ``kept[b]`` of row b.

        Caches stay rectangular: every row is cropped to ``kept_max`` (= ``max(kept)``, known on the
        host), and a row that kept fewer gets holes (attention mask 0) where its rejected drafts were.
        A crop by zero is skipped, not passed on (``crop(-0)`` empties the cache in some versions).
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
    """Keep only ``rows`` in every runner's batch; returns the new batch size."""
    index = torch.tensor(list(rows), dtype=torch.long)
    for runner in runners.values():
        runner.retain(index)
    return len(index)

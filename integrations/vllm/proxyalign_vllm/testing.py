"""Helpers to check the vLLM model against proxyalign itself: tiny checkpoints vLLM's CPU build can
run, and the reference log pi from the Hugging Face models' own logits through the same
:func:`~proxyalign.engine.hybrid.hybrid_log_pi`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from proxyalign.engine.hybrid import hybrid_log_pi
from proxyalign.engine.sampling import RowSampling, SamplingConfig
from proxyalign.plugins import get_criterion

__all__ = [
    "TINY_PADDED_VOCAB",
    "TINY_REAL_VOCAB",
    "full_logprobs",
    "reference_log_pi",
    "save_tiny_vllm_models",
]

#: The tiny tokenizer's vocabulary; the tiny p and q pad their output layers beyond it.
TINY_REAL_VOCAB = 64
#: The tiny p's (and q's) output width, padding included: the width of vLLM's logprobs.
TINY_PADDED_VOCAB = 72


def save_tiny_vllm_models(root: str | Path) -> dict[str, str]:
    """Tiny random p, q* and q with :func:`proxyalign.testing.tiny_tokenizer`, saved for vLLM.

    Unlike :func:`proxyalign.testing.save_tiny_pair` (head size 8), heads are 32 wide: vLLM's CPU
    attention supports head sizes 32, 64, 80 ... only. p and q pad their vocabulary to 72 rows, as real
    checkpoints do, so the padded ids (pi = 0) are exercised; four attention heads and two KV heads
    split over two tensor-parallel ranks.
    """
    from proxyalign.testing import tiny_model, tiny_tokenizer

    dirs = {}
    models = (
        ("base", 0, 2, TINY_PADDED_VOCAB),
        ("aligned", 1, 1, TINY_REAL_VOCAB),
        ("small_base", 2, 1, TINY_PADDED_VOCAB),
    )
    for role, seed, layers, vocab in models:
        path = Path(root) / role
        tiny_model(seed, layers, vocab_size=vocab, hidden=128, scale=0.5).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        dirs[role] = str(path)
    return dirs


def load_hf_models(dirs: Mapping[str, str | Path], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The checkpoints as transformers models, by role."""
    from transformers import AutoModelForCausalLM

    return {
        role: AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval() for role, d in dirs.items()
    }


@torch.no_grad()
def reference_log_pi(
    models: Mapping[str, Any],
    criterion: str,
    criterion_params: Mapping[str, Any] | None,
    tokens: Sequence[int],
    positions: Sequence[int],
    vocab_size: int,
    sampling: SamplingConfig | None = None,
) -> torch.Tensor:
    """log pi ``[len(positions), vocab_size]`` for the token after each of ``positions`` in ``tokens``,
    from each model's own logits (transformers, one forward pass over the whole sequence)."""
    built = get_criterion(criterion, **dict(criterion_params or {}))
    ids = torch.tensor([list(tokens)])
    index = torch.tensor(list(positions))
    logits = {
        role: model(ids).logits[0, index].float()
        for role, model in models.items()
        if role != "small_base" or built.needs_small_base
    }
    rows = RowSampling.from_configs([sampling or SamplingConfig()] * len(index), "cpu")
    log_pi, checked = hybrid_log_pi(built, logits, vocab_size, rows)
    assert not bool(checked.invalid), f"criterion {criterion} returned invalid values"
    return log_pi


def full_logprobs(step: Mapping[int, Any], width: int) -> torch.Tensor:
    """One step of vLLM's ``logprobs=-1`` output as a dense ``[width]`` tensor (absent ids: -inf)."""
    dense = torch.full((width,), -math.inf, dtype=torch.float64)
    for token, logprob in step.items():
        dense[token] = logprob.logprob
    return dense

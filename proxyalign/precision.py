"""Wide bf16 matmuls computed in float32 on CPUs that only emulate bf16.

Without AVX512-BF16 or AMX a bf16 matmul has no matrix path on the CPU: its cost grows by about one
row's worth per row (``benchmarks/matmul_paths.py``: 40 rows cost 31x one row, float32 5x), so a
prompt's prefill, p verifying a speculative round at batch 8, or a token step of a large batch run
several times slower in bf16 than in float32. Converting a layer's weight to float32 for the call
costs about one pass over the weight, which pays once a call has enough rows. So on such a host each
bf16 linear layer of a loaded model computes calls of at least :func:`float32_rows` rows in float32
and smaller ones in bf16 as before. The upcast weight goes into one scratch buffer per thread, the size
of the largest layer, reused by every layer: nothing is stored twice, and a fresh allocation per call
would cost 8x the conversion itself in page faults.

The threshold is measured, not guessed from CPU flags: on a host with native bf16 float32 never wins
and nothing changes; on a GPU nothing is installed. Both paths multiply the same bf16 values and
accumulate in float32, so they differ only in summation order, as two batch shapes already do.
``PROXYALIGN_WIDE_FLOAT32=0`` turns it off (``=1`` or unset: measure).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["float32_rows", "upcast_wide_matmuls"]

log = logging.getLogger(__name__)

CANDIDATE_ROWS = (8, 16, 32, 64, 128)
MIN_GAIN = 0.8  #: float32 (with its upcast) must take at most this fraction of bf16's time
ENV = "PROXYALIGN_WIDE_FLOAT32"


def _fastest(call: Any, reps: int = 5) -> float:
    call()  # warm-up: allocation, kernel choice
    best = math.inf
    for _ in range(reps):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


class _Scratch(threading.local):
    buffer: torch.Tensor | None = None


_scratch = _Scratch()


def _as_float32(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float32, in this thread's scratch buffer (valid until the next call).

    The buffer is a normal tensor even when first needed under ``torch.inference_mode`` (the engine's
    steps): an inference tensor could not be written outside it (HF ``generate`` runs under ``no_grad``).
    """
    if _scratch.buffer is None or _scratch.buffer.numel() < weight.numel():
        with torch.inference_mode(False):
            _scratch.buffer = torch.empty(weight.numel(), dtype=torch.float32)
    upcast = _scratch.buffer[: weight.numel()].view(weight.shape)
    upcast.copy_(weight)
    return upcast


@functools.cache
def float32_rows(out_features: int, in_features: int, threads: int) -> int | None:
    """The fewest rows from which a bf16 ``[out, in]`` linear is faster upcast to float32 on this CPU
    with ``threads`` threads (None: never, e.g. native bf16). Measured once per shape, in well under a
    second."""
    del threads  # part of the cache key only: the balance moves with the threads a matmul gets
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    for rows in CANDIDATE_ROWS:
        x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
        with torch.inference_mode():
            emulated = _fastest(lambda x=x: F.linear(x, weight))
            upcast = _fastest(lambda x=x: F.linear(x.float(), _as_float32(weight)).to(torch.bfloat16))
        if upcast <= MIN_GAIN * emulated:
            return rows
    return None


def _linear_with_wide_float32(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # With autograd recording, a shared buffer rewritten by the next layer would corrupt the graph.
    if x.numel() >= self.float32_from_rows * self.in_features and not torch.is_grad_enabled():
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), _as_float32(self.weight), bias).to(x.dtype)
    return F.linear(x, self.weight, self.bias)


def upcast_wide_matmuls(model: Any, rows: int | None = None) -> int | None:
    """Make ``model``'s bf16 CPU linear layers compute calls of ``rows`` rows or more in float32.

    ``rows=None`` measures the threshold on this CPU (:func:`float32_rows`, for the model's widest
    layer); nothing is installed where float32 never wins (native bf16), where the model has no bf16
    CPU layer (a GPU, float32 weights), or when ``PROXYALIGN_WIDE_FLOAT32=0``. The output layer is left
    alone: it sees only the positions whose logits are kept, and it is the largest (the vocabulary).
    Returns the threshold installed, or None.
    """
    if os.environ.get(ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1 or None (measure), got {rows}")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        module
        for module in model.modules()
        if isinstance(module, nn.Linear)
        and module is not output
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
    ]
    if not linears:
        return None
    if rows is None:
        widest = max(linears, key=lambda module: module.weight.numel())
        rows = float32_rows(widest.out_features, widest.in_features, torch.get_num_threads())
        if rows is None:
            return None
        log.info("bf16 is emulated on this CPU: linear calls of %d+ rows compute in float32", rows)
    for module in linears:
        module.float32_from_rows = rows
        module.forward = types.MethodType(_linear_with_wide_float32, module)
    return rows

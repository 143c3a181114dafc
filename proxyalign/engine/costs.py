"""What a forward pass costs on this host: seconds per model, batch rows and positions, measured once.

``mode="auto"`` needs to know, for the pair as loaded here, what q*'s one-position step, p's step and
p's verification of ``k`` positions cost at the batch size it runs at. Those ratios are what decide
whether speculation pays, and they depend on the host more than on the models: on a CPU with native
bf16 (AMX, AVX512-BF16) p verifies 5 positions for about the price of 1, while with bf16 emulated
(AVX2 only) each extra position costs nearly a whole step (``benchmarks/matmul_paths.py``). So they
are measured rather than assumed: lazily, the first time a batch size is needed, and kept for the
life of the engine (one loaded pair).

A measurement is one forward of ``rows x positions`` random tokens with no cache, plus the log-softmax
every decoding step applies to the logits it keeps: with short contexts the weights dominate, so this
matches a cached step within noise, and it costs no prefill. Batch sizes are measured at powers of two
and interpolated between; the device is synchronised around each timing (calibration only, never in
the decoding loop).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from proxyalign.roles import ALIGNED

__all__ = ["ForwardCosts", "row_buckets"]

log = logging.getLogger(__name__)

MIN_SPENT_S = 0.05
MAX_REPS = 20


def row_buckets(rows: int) -> tuple[int, int]:
    """The powers of two around ``rows`` (equal when ``rows`` is one)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    low = 1 << (rows.bit_length() - 1)
    return low, (low if low == rows else low * 2)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu" and hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


class ForwardCosts:
    """Seconds per forward pass, by ``(role, rows, positions)``; measured on first use and kept.

    Thread-safe; :attr:`measuring_s` says how long calibration has taken so far (it runs inside the
    engine's step, so the rows decoding wait for it once per batch size).
    """

    def __init__(self, models: Mapping[str, Any], *, reps: int = 3, seed: int = 0) -> None:
        self.models = dict(models)
        self.reps = reps
        self.seed = seed
        self.measuring_s = 0.0
        self._seconds: dict[tuple[str, int, int], float] = {}
        self._lock = threading.Lock()

    def seconds(self, role: str, rows: int, positions: int = 1) -> float:
        """A forward of ``role``'s model over ``rows`` rows of ``positions`` new tokens each."""
        low, high = row_buckets(rows)
        at_low = self._measured(role, low, positions)
        if high == low:
            return at_low
        at_high = self._measured(role, high, positions)
        return at_low + (at_high - at_low) * (rows - low) / (high - low)

    def calibrate(self, max_rows: int, max_positions: int) -> float:
        """Measure now everything decoding up to ``max_rows`` rows may ask for: each model's step and
        the verifying models' forwards over up to ``max_positions`` positions, at every power-of-two
        batch size up to ``max_rows``'s. A running batch grows row by row as prompts are prefilled, so
        without this the first auto calls stall once per new size; a server or a benchmark can call it
        at start-up instead. Returns the seconds it took (nothing already measured is measured again).
        """
        if max_rows < 1 or max_positions < 1:
            raise ValueError(f"max_rows and max_positions must be >= 1, got {max_rows}, {max_positions}")
        before = self.measuring_s
        top = row_buckets(max_rows)[1]
        rows = 1
        while rows <= top:
            for role in self.models:
                for positions in range(1, (1 if role == ALIGNED else max_positions) + 1):
                    self._measured(role, rows, positions)
            rows *= 2
        return self.measuring_s - before

    def known(self) -> dict[tuple[str, int, int], float]:
        """Everything measured so far (a copy)."""
        with self._lock:
            return dict(self._seconds)

    def _measured(self, role: str, rows: int, positions: int) -> float:
        key = (role, rows, positions)
        with self._lock:
            if key not in self._seconds:
                started = time.perf_counter()
                self._seconds[key] = self._time(role, rows, positions)
                spent = time.perf_counter() - started
                self.measuring_s += spent
                log.debug(
                    "measured %s: %d rows x %d positions = %.4f s per forward (took %.2f s)",
                    role,
                    rows,
                    positions,
                    self._seconds[key],
                    spent,
                )
            return self._seconds[key]

    @torch.inference_mode()
    def _time(self, role: str, rows: int, positions: int) -> float:
        model = self.models[role]
        device = model.get_input_embeddings().weight.device
        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(vocab, (rows, positions), generator=generator).to(device)
        best, spent, rep = math.inf, 0.0, 0
        # The first run warms up (allocations, kernel selection); then the fastest of at least ``reps``
        # runs, more for fast forwards (up to MIN_SPENT_S in all), so one interruption cannot count.
        while rep <= self.reps or (spent < MIN_SPENT_S and rep <= MAX_REPS):
            _synchronize(device)
            started = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions).logits
            torch.log_softmax(logits.float(), dim=-1)
            _synchronize(device)
            if rep:
                took = time.perf_counter() - started
                best, spent = min(best, took), spent + took
            rep += 1
        return best

"""``hybrid_log_pi``: the one function from the models' logits to log pi that the HF engine's lanes and the
vLLM model share, against the independent float64 reference of ``tests/reference.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proxyalign.engine.hybrid import hybrid_log_pi
from proxyalign.engine.sampling import RowSampling, SamplingConfig
from proxyalign.plugins import get_criterion, list_criteria
from tests.reference import hybrid_pi

BUILTIN = sorted(info.name for info in list_criteria() if info.builtin)
SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 12},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.95, "criterion_on": "raw"},
]


def _logits(rows: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        role: torch.randn(rows, vocab + 3, generator=generator) * 2.5  # a model's padded vocabulary
        for role in ("base", "aligned", "small_base")
    }


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("name", BUILTIN)
def test_log_pi_equals_the_independent_reference(name, settings):
    criterion = get_criterion(name)
    vocab, rows = 50, 4
    logits = _logits(rows, vocab, seed=len(name))
    if not criterion.needs_small_base:
        del logits["small_base"]
    config = SamplingConfig(
        settings["temperature"],
        settings.get("top_k"),
        settings.get("top_p"),
        criterion_on=settings.get("criterion_on", "scaled"),
    )
    sampling = RowSampling.from_configs([config] * rows, "cpu")
    log_pi, checked = hybrid_log_pi(criterion, logits, vocab, sampling)
    assert not bool(checked.invalid)
    assert log_pi.shape == (rows, vocab)
    expected = hybrid_pi(
        criterion,
        {role: x[:, :vocab].double().numpy() for role, x in logits.items()},
        settings["temperature"],
        settings.get("top_k"),
        settings.get("top_p"),
        settings.get("criterion_on", "scaled"),
    )
    np.testing.assert_allclose(log_pi.exp().double().numpy(), expected, atol=2e-6)
    assert torch.isneginf(log_pi[torch.from_numpy(expected) == 0]).all(), "log 0 is -inf, not NaN"

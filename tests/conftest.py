"""Shared fixtures. Tests never reach a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from proxyalign.testing import tiny_aligner


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def aligner():
    """A tiny p/q* pair (no small base); tests pass the criterion per call."""
    return tiny_aligner("dual_kad")


@pytest.fixture(scope="session")
def aligner_with_q():
    """A tiny p/q*/q triple for criteria that need the small base model."""
    return tiny_aligner("implicit_reward", small_base=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module (stopped after it, so that its idle daemons do
    not run beside the rest of the suite)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'proxyalign[ray]'")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()

"""Shared fixtures: tiny random models for speed, the real offline pair for the few real-weights tests."""

from __future__ import annotations

import functools
import os

# Tests never reach a model hub: a hub id must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from proxyalign import ProxyAligner
from proxyalign.testing import REAL_PAIR, real_pair_dirs, real_tokenizer, tiny_chat_model
from proxyalign.testing.fixtures import TINY_NAMES, count_calls, one_torch_thread, tiny  # noqa: F401

NAMES = TINY_NAMES
SKIP_REAL = "real offline pair not fetched: run `proxyalign models fetch qwen2.5-coder-pair` (CI does)"
#: Positions the tiny chat models attend to: a Qwen2.5 system prompt with two tools is ~260 tokens.
CHAT_WINDOW = 1024


@functools.cache
def tiny_chat_pair() -> ProxyAligner | None:
    """Tiny random models over the real pair's tokenizer and chat template (Hermes tool calls), for
    tool-calling and structured-output tests; None when the real pair is not fetched.

    As :func:`proxyalign.testing.tiny_chat_aligner`, with a window long enough for tool prompts. Shared
    by every test (its first grammar builds llguidance's view of the 150k vocabulary, about 1.5 s).
    """
    tokenizer = real_tokenizer()
    if tokenizer is None:
        return None
    base, aligned = tiny_chat_model(10, tokenizer, layers=2), tiny_chat_model(11, tokenizer)
    for model in (base, aligned):
        model.config.max_position_embeddings = CHAT_WINDOW
    return ProxyAligner(
        base, aligned, tokenizer, criterion="dual_kad", names={"base": "tiny-base", "aligned": "tiny-aligned"}
    )


@pytest.fixture
def tiny_chat() -> ProxyAligner:
    """:func:`tiny_chat_pair`, or a skip when the real pair's tokenizer is not there."""
    aligner = tiny_chat_pair()
    if aligner is None:
        pytest.skip(SKIP_REAL)
    return aligner


@pytest.fixture(scope="session")
def real_aligner() -> ProxyAligner:
    """The real 1.5B + 0.5B pair in bf16 on CPU, loaded once per test session (by asset name)."""
    if real_pair_dirs() is None:
        pytest.skip(SKIP_REAL)
    base, aligned = REAL_PAIR
    return ProxyAligner.from_pretrained(
        base=base, aligned=aligned, dtype="bfloat16", device="cpu", criterion="confidence_bet"
    )

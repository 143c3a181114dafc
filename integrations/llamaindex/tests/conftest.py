"""Shared fixtures: tiny random models for speed, the real offline pair for the few real-weights tests,
and real documents (this repository's docs) for the query-engine tests."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a model hub: a hub id must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from proxyalign import ProxyAligner
from proxyalign.testing import REAL_PAIR, real_pair_dirs, tiny_aligner, tiny_chat_aligner
from proxyalign.testing.fixtures import TINY_NAMES, count_calls, one_torch_thread, tiny  # noqa: F401

NAMES = TINY_NAMES
SKIP_REAL = "real offline pair not fetched: run `proxyalign models fetch qwen2.5-coder-pair` (CI does)"


@pytest.fixture
def tiny_long() -> ProxyAligner:
    """Tiny models with a 4096-token window: LlamaIndex's prompt templates alone exceed 256 tokens."""
    aligner = tiny_aligner(names=NAMES)
    for model in aligner.models.values():
        model.config.max_position_embeddings = 4096
    return aligner


@pytest.fixture(scope="module")
def tiny_tools() -> ProxyAligner:
    """Tiny random models over the real pair's tokenizer and chat template (Hermes ``<tool_call>`` blocks),
    with a 4096-token window for tool prompts; skipped when the real pair is not fetched."""
    aligner = tiny_chat_aligner()
    if aligner is None:
        pytest.skip(SKIP_REAL)
    for model in aligner.models.values():
        model.config.max_position_embeddings = 4096
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


REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def repo_docs() -> list[Path]:
    """This repository's Markdown documentation: docs/, the README and the integration READMEs."""
    files = sorted({*REPO.glob("docs/**/*.md"), *REPO.glob("integrations/*/README.md"), REPO / "README.md"})
    files = [f for f in files if f.is_file() and f.stat().st_size > 0]
    assert files, f"no Markdown documentation found under {REPO}"
    return files

"""Shared fixtures: tiny checkpoints, and one vLLM engine per configuration (each start costs ~30 s on
CPU), whose criterion the tests switch through the worker extension rather than restarting."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# vLLM's CPU build reserves this much KV cache (GiB) and pins OpenMP threads unless told otherwise.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from proxyalign_vllm.testing import save_tiny_vllm_models

    return save_tiny_vllm_models(tmp_path_factory.mktemp("tiny-vllm"))


@pytest.fixture(scope="session")
def hf_models(tiny_dirs: dict[str, str]) -> dict[str, Any]:
    from proxyalign_vllm.testing import load_hf_models

    return load_hf_models(tiny_dirs)


def start_engine(**kwargs: Any) -> Any:
    """A ``vllm.LLM`` for the hybrid (eager, float32, full-vocabulary logprobs allowed)."""
    from vllm import LLM

    import proxyalign_vllm

    kwargs = {"dtype": "float32", "max_model_len": 256, "max_logprobs": -1, "enforce_eager": True, **kwargs}
    return LLM(**proxyalign_vllm.engine_args(**kwargs))


def stop_engine(llm: Any) -> None:
    """Free the engine's processes before the next module starts its own."""
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def engine_factory() -> Iterator[Any]:
    started: list[Any] = []

    def start(**kwargs: Any) -> Any:
        started.append(start_engine(**kwargs))
        return started[-1]

    yield start
    for llm in started:
        stop_engine(llm)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The real-pair tests need the offline pair; skip them cleanly without it."""
    from proxyalign.testing import real_pair_dirs

    if real_pair_dirs() is None:
        skip = pytest.mark.skip(reason="real pair not fetched (`make fetch`)")
        for item in items:
            if "real_weights" in item.keywords:
                item.add_marker(skip)

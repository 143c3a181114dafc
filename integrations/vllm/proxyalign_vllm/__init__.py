"""proxyalign's hybrid as a vLLM model: vLLM serves and parallelizes p and q*, the model returns log pi.

Usage::

    from vllm import LLM, SamplingParams
    import proxyalign_vllm

    llm = LLM(**proxyalign_vllm.engine_args(base=p_dir, aligned=q_star_dir, criterion="dual_kad"))
    llm.generate(["..."], SamplingParams(max_tokens=64))  # temperature 1, no filters: see engine_args

vLLM finds the architecture through this package's ``vllm.general_plugins`` entry point
(:func:`register`), which it runs in every process it starts.
"""

from __future__ import annotations

from typing import Any

from proxyalign_vllm.settings import ARCHITECTURE, HybridSettings, engine_args

__all__ = ["ARCHITECTURE", "HybridSettings", "engine_args", "register", "set_criterion"]


def register() -> None:
    """Add the hybrid to vLLM's model registry (lazily: the class is imported when a model is built)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "proxyalign_vllm.model:ProxyAlignHybrid")


def set_criterion(llm: Any, criterion: str, criterion_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Switch a running ``vllm.LLM``'s criterion in every worker, from its next step on (engine-wide:
    requests in flight change criterion too). Needs the engine built by :func:`engine_args`."""
    from proxyalign.plugins import get_criterion

    built = get_criterion(criterion, **dict(criterion_params or {}))  # fail here, not in the workers
    results = llm.collective_rpc("proxyalign_set_criterion", args=(criterion, dict(built.params)))
    return results[0]

"""The hybrid as one vLLM model: p, q* (and q) are vLLM's own model classes, the logits are log pi.

vLLM builds this class for p's checkpoint (its architecture overridden to ``ProxyAlignHybrid``), so
vLLM's loader, scheduler, paged KV cache and tensor parallelism serve all the models at once: each
sub-model gets its own attention layers under its own prefix (``base.``, ``aligned.``,
``small_base.``), hence its own KV cache. Only :meth:`ProxyAlignHybrid.compute_logits` is ours, and it
is proxyalign's :func:`~proxyalign.engine.hybrid.hybrid_log_pi`, the function behind the HF engine's
lanes, so the two agree by construction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from proxyalign.criteria.base import Criterion
from proxyalign.engine.hybrid import criterion_error, hybrid_log_pi
from proxyalign.engine.sampling import RowSampling
from proxyalign.errors import InvalidParameterError
from proxyalign.plugins import get_criterion
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.weight_utils import (
    filter_duplicate_safetensors_files,
    safetensors_weights_iterator,
)
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.transformers_utils.config import get_config

from proxyalign_vllm.settings import HybridSettings

__all__ = ["ProxyAlignHybrid"]

logger = init_logger(__name__)


def _checkpoint_weights(directory: str) -> Iterable[tuple[str, torch.Tensor]]:
    """A small model's weights from its own directory (vLLM's loader only reads p's)."""
    files = sorted(str(path) for path in Path(directory).glob("*.safetensors"))
    files = filter_duplicate_safetensors_files(files, directory, "model.safetensors.index.json")
    return safetensors_weights_iterator(files, use_tqdm_on_load=False)


def _small_model_config(vllm_config: VllmConfig, directory: str) -> tuple[VllmConfig, Any]:
    """p's engine configuration seen through a small model's Hugging Face config: same dtype, cache
    and parallelism, no quantization (p's quantization describes p's checkpoint only)."""
    hf_config = get_config(directory, trust_remote_code=vllm_config.model_config.trust_remote_code)
    sub = vllm_config.with_hf_config(hf_config, architectures=list(hf_config.architectures or ()))
    sub.model_config.hf_text_config = sub.model_config.hf_config.get_text_config()
    return replace(sub, quant_config=None), hf_config


class ProxyAlignHybrid(nn.Module):
    """p and q* (and q when the criterion needs it) in one vLLM model whose logits are log pi."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise InvalidParameterError(
                "pipeline_parallel_size must be 1: the hybrid runs whole models per rank"
            )
        self.settings = HybridSettings.from_hf_config(vllm_config.model_config.hf_config)
        self.base = init_vllm_registered_model(
            vllm_config,
            prefix=maybe_prefix(prefix, BASE),
            hf_config=vllm_config.model_config.hf_config,
            architectures=list(self.settings.base_architectures),
        )
        self.aligned = self._small_model(vllm_config, self.settings.aligned, maybe_prefix(prefix, ALIGNED))
        self.small_base = (
            self._small_model(vllm_config, self.settings.small_base, maybe_prefix(prefix, SMALL_BASE))
            if self.settings.small_base is not None
            else None
        )
        self.vocab_size = vllm_config.model_config.get_vocab_size()  # p's output width, padding included
        self.set_criterion(self.settings.criterion, self.settings.criterion_params)
        self._rows: dict[tuple[int, torch.device], RowSampling] = {}
        self._last_check: tuple[Any, Criterion] | None = None

    @staticmethod
    def _small_model(vllm_config: VllmConfig, directory: str, prefix: str) -> nn.Module:
        sub, _ = _small_model_config(vllm_config, directory)
        with set_model_tag(f"proxyalign_{prefix.replace('.', '_')}"):  # its own compiled graphs, if any
            return init_vllm_registered_model(sub, prefix=prefix)

    @property
    def _models(self) -> list[tuple[str, nn.Module]]:
        models = [(BASE, self.base), (ALIGNED, self.aligned)]
        if self.small_base is not None:
            models.append((SMALL_BASE, self.small_base))
        return models

    # -- the hybrid ------------------------------------------------------------------------------------
    def set_criterion(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Use another criterion from the next step on, engine-wide (vLLM hands a model no request
        identities, so a criterion cannot be per request). Returns the criterion's validated params."""
        criterion: Criterion = get_criterion(name, **dict(params or {}))
        if criterion.needs_small_base and self.small_base is None:
            raise InvalidParameterError(
                f"criterion {name!r} needs the small base model q; start the engine with small_base=..."
            )
        self.criterion = criterion
        return dict(criterion.params)

    def _row_sampling(self, rows: int, device: torch.device) -> RowSampling:
        key = (rows, device)
        if key not in self._rows:
            self._rows[key] = RowSampling.from_configs([self.settings.sampling()] * rows, device)
        return self._rows[key]

    # -- vLLM's model interface ------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """p's embeddings; vLLM asks for them only for prompt embeddings, which the hybrid refuses."""
        return self.base.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every model over the same tokens; their hidden states side by side (vLLM passes the one
        tensor on, row-selected, to :meth:`compute_logits`, which splits it again)."""
        if inputs_embeds is not None or input_ids is None:
            raise InvalidParameterError("the hybrid needs token ids: each model embeds them its own way")
        hidden = [model(input_ids, positions, None, None) for _, model in self._models]
        return torch.cat(hidden, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """log pi, ``-inf`` where pi is 0 (p's padded vocabulary rows included)."""
        sizes = [model.config.hidden_size for _, model in self._models]
        logits: dict[str, torch.Tensor] = {}
        for (role, model), part in zip(self._models, hidden_states.split(sizes, dim=-1), strict=True):
            if role == SMALL_BASE and not self.criterion.needs_small_base:
                continue
            out = model.compute_logits(part)
            if out is None:  # a tensor-parallel rank that the gather skipped
                return None
            logits[role] = out.float()
        rows = hidden_states.shape[0]
        log_pi, checked = hybrid_log_pi(
            self.criterion, logits, self.settings.vocab_size, self._row_sampling(rows, hidden_states.device)
        )
        # The flag is read one step late, when that step's work is long done: no host sync per step.
        # (Raising would kill the engine for every request in flight: the rows sample from p instead.)
        previous, self._last_check = self._last_check, (checked, self.criterion)
        if previous is not None and bool(previous[0].invalid):
            logger.error("%s; those rows sampled from p instead", criterion_error(previous[1], previous[0]))
        if log_pi.shape[-1] < self.vocab_size:
            pad = log_pi.new_full((rows, self.vocab_size - log_pi.shape[-1]), float("-inf"))
            log_pi = torch.cat([log_pi, pad], dim=-1)
        return log_pi

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """p's weights from vLLM's loader, the small models' from their own directories; names come back
        under each model's prefix, so that vLLM's check that every parameter was loaded holds."""
        loaded = {f"{BASE}.{name}" for name in self.base.load_weights(weights)}
        for role, model in self._models[1:]:
            directory = self.settings.aligned if role == ALIGNED else self.settings.small_base
            assert directory is not None
            loaded |= {f"{role}.{name}" for name in model.load_weights(_checkpoint_weights(directory))}
        return loaded

    def describe(self) -> str:
        """The hybrid's configuration, as JSON: for logs and tests."""
        return json.dumps({"criterion": self.criterion.name, "params": self.criterion.params})

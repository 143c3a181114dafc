"""The hybrid's settings, validated before vLLM starts, and the ``vllm.LLM`` arguments that carry them.

vLLM builds the model from p's checkpoint in every worker process; the only channel from the caller to
that constructor is p's Hugging Face config, so the settings travel as one JSON string in
``hf_overrides`` (flat: vLLM treats dict-valued overrides as sub-config updates).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proxyalign.engine.sampling import MIN_TEMPERATURE, SamplingConfig
from proxyalign.errors import InvalidParameterError
from proxyalign.plugins import get_criterion

__all__ = ["ARCHITECTURE", "SETTINGS_KEY", "HybridSettings", "engine_args"]

#: The architecture name under which :func:`proxyalign_vllm.register` adds the hybrid to vLLM.
ARCHITECTURE = "ProxyAlignHybrid"
#: The attribute of p's (overridden) Hugging Face config that holds :class:`HybridSettings` as JSON.
SETTINGS_KEY = "proxyalign_hybrid"
#: vLLM's own logits-processor hook, used only to refuse request settings that would change pi.
REQUEST_GUARD = "proxyalign_vllm.guard:HybridRequestGuard"
#: Worker methods callable through ``LLM.collective_rpc`` (switching the criterion engine-wide).
WORKER_EXTENSION = "proxyalign_vllm.worker.HybridWorkerExtension"  # a dotted qualname here


@dataclass(frozen=True)
class HybridSettings:
    """Everything the vLLM model needs besides p's own checkpoint."""

    aligned: str
    criterion: str
    criterion_params: dict[str, Any] = field(default_factory=dict)
    small_base: str | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    criterion_on: str = "scaled"
    #: p's own architectures (the override replaces them with :data:`ARCHITECTURE`).
    base_architectures: tuple[str, ...] = ()
    #: Ids below this are real tokens (the tokenizers' shared vocabulary); padded rows get pi = 0.
    vocab_size: int = 0

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.criterion_on)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HybridSettings:
        data = json.loads(text)
        data["base_architectures"] = tuple(data.get("base_architectures", ()))
        return cls(**data)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> HybridSettings:
        text = getattr(hf_config, SETTINGS_KEY, None)
        if not isinstance(text, str):
            raise InvalidParameterError(
                f"the {ARCHITECTURE} architecture needs its settings in hf_overrides[{SETTINGS_KEY!r}]; "
                "build the vLLM arguments with proxyalign_vllm.engine_args(...)"
            )
        return cls.from_json(text)


def _directory(name: str, value: Any) -> Path:
    """A local checkpoint directory, or a hub id ("org/name") resolved to its snapshot (from the cache
    when ``HF_HUB_OFFLINE=1``): q* and q are read from disk by the hybrid itself, not by vLLM."""
    if isinstance(value, str | Path) and Path(value).is_dir():
        path = Path(value)
    elif isinstance(value, str) and value.count("/") == 1 and not value.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(value, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
        except Exception as exc:
            raise InvalidParameterError(
                f"{name}: {value!r} is neither a local directory nor a fetchable hub model ({exc})"
            ) from exc
    else:
        raise InvalidParameterError(
            f"{name} must be a checkpoint directory (config.json, *.safetensors) or a hub id, got {value!r}"
        )
    if not (path / "config.json").is_file():
        raise InvalidParameterError(f"{name}: {path} has no config.json")
    return path


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def check_tensor_parallel(name: str, config: Mapping[str, Any], size: int) -> None:
    """vLLM shards every attention layer's heads across the tensor-parallel ranks: q* and q must split
    as evenly as p (KV heads may also be replicated, when fewer than the ranks and dividing them)."""
    text = _text_config(config)
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or heads % size:
        raise InvalidParameterError(
            f"tensor_parallel_size={size} does not divide the {name} model's {heads} attention heads; "
            f"choose a tensor_parallel_size that divides every model's head count"
        )
    if isinstance(kv_heads, int) and kv_heads % size and size % kv_heads:
        raise InvalidParameterError(
            f"tensor_parallel_size={size} and the {name} model's {kv_heads} key/value heads do not "
            "divide one another; choose a tensor_parallel_size that divides every model's KV-head count"
        )


def _shared_vocabulary(dirs: Mapping[str, Path]) -> int:
    """The tokenizers' shared real vocabulary (proxyalign's own check), so that pi is exactly zero on
    the embedding rows a checkpoint pads its vocabulary with, as in proxyalign's engine."""
    from proxyalign.models import check_same_vocabulary
    from transformers import AutoTokenizer

    tokenizers = {name: AutoTokenizer.from_pretrained(str(path)) for name, path in dirs.items()}
    return check_same_vocabulary(tokenizers)


def engine_args(
    base: str | Path,
    aligned: str | Path,
    criterion: str = "dual_kad",
    criterion_params: Mapping[str, Any] | None = None,
    small_base: str | Path | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    criterion_on: str = "scaled",
    tensor_parallel_size: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (or ``AsyncEngineArgs``) that serve the hybrid of p=``base``
    and q*=``aligned``; everything is checked here, before vLLM spends minutes starting.

    Sampling settings (temperature, top-k, top-p, criterion_on) belong to the engine: each model's
    distribution is tempered and filtered inside the model as proxyalign does, so requests must run at
    vLLM's temperature 1 with no filters (others are refused). ``extra`` goes to vLLM as is (``dtype``,
    ``max_model_len``, ``enforce_eager``, ...).
    """
    base_dir = _directory("base", base)
    aligned_dir = _directory("aligned", aligned)
    if not isinstance(criterion, str):
        raise InvalidParameterError("criterion must be a registered name (it is rebuilt in vLLM's workers)")
    built = get_criterion(criterion, **dict(criterion_params or {}))  # unknown names/params fail by name
    small_dir = _directory("small_base", small_base) if small_base is not None else None
    if built.needs_small_base and small_dir is None:
        raise InvalidParameterError(f"criterion {criterion!r} needs the small base model q (small_base=...)")
    sampling = SamplingConfig(temperature, top_k, top_p, criterion_on)  # type: ignore[arg-type]
    if sampling.greedy:
        raise InvalidParameterError(
            f"temperature must be >= {MIN_TEMPERATURE} here: the hybrid's greedy rule (argmax p, handed to "
            "argmax q* on rejection) is not a distribution vLLM can sample; got temperature="
            f"{temperature!r}"
        )
    if (
        isinstance(tensor_parallel_size, bool)
        or not isinstance(tensor_parallel_size, int)
        or tensor_parallel_size < 1
    ):
        raise InvalidParameterError(
            f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}"
        )
    if extra.get("pipeline_parallel_size", 1) != 1:
        raise InvalidParameterError("pipeline_parallel_size must be 1: the hybrid runs whole models per rank")
    for key in ("model", "hf_overrides", "generation_config"):
        if key in extra:
            raise InvalidParameterError(f"{key} is set by engine_args and cannot be passed")

    dirs = {"base": base_dir, "aligned": aligned_dir}
    if small_dir is not None:
        dirs["small_base"] = small_dir
    configs = {name: _config(path) for name, path in dirs.items()}
    for name, config in configs.items():
        check_tensor_parallel(name, config, tensor_parallel_size)
        if not any(path.suffix == ".safetensors" for path in dirs[name].iterdir()):
            raise InvalidParameterError(f"{name}: {dirs[name]} has no *.safetensors weights")
    architectures = tuple(configs["base"].get("architectures") or ())
    if not architectures or ARCHITECTURE in architectures:
        raise InvalidParameterError(f"base: {base_dir}/config.json names no usable architectures")
    dtype = extra.pop("dtype", "auto")

    settings = HybridSettings(
        aligned=str(aligned_dir.resolve()),
        criterion=criterion,
        criterion_params=dict(built.params),
        small_base=str(small_dir.resolve()) if small_dir is not None else None,
        temperature=float(temperature),
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
        criterion_on=criterion_on,
        base_architectures=architectures,
        vocab_size=_shared_vocabulary(dirs),
    )
    return {
        "model": str(base_dir.resolve()),
        "hf_overrides": {"architectures": [ARCHITECTURE], SETTINGS_KEY: settings.to_json()},
        # the checkpoint's generation_config.json would set request defaults (temperature, top_p ...)
        "generation_config": "vllm",
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": dtype,
        "logits_processors": [REQUEST_GUARD, *extra.pop("logits_processors", [])],
        "worker_extension_cls": extra.pop("worker_extension_cls", WORKER_EXTENSION),
        **extra,
    }

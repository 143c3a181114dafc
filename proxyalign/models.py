"""Loading the models of a hybrid and checking that they share one vocabulary.

A model is given as a hub id, a local directory, a ``.gguf`` file, or the name of an offline asset
(see :mod:`proxyalign.assets`). Loading never silently trusts remote code and fails fast, with what was
tried, when a hub id cannot be resolved (e.g. offline).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from proxyalign.errors import InvalidParameterError, ModelLoadError, TokenizerMismatchError
from proxyalign.precision import upcast_wide_matmuls

__all__ = [
    "DTYPES",
    "LoadedModel",
    "check_model_spec",
    "check_same_vocabulary",
    "config_window",
    "context_window",
    "eos_token_ids",
    "load_model",
    "load_tokenizer",
    "peek_window",
    "real_vocab_size",
    "resolve_device",
    "resolve_dtype",
]

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the name it was loaded from (for messages and cache keys)."""

    model: Any
    tokenizer: Any
    name: str


def resolve_dtype(dtype: str | torch.dtype | None, role: str = "model") -> torch.dtype | str:
    """A torch dtype (or ``"auto"``) from a name; unknown names list the accepted ones."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    accepted = ", ".join(DTYPES)
    raise InvalidParameterError(f"dtype for {role} must be one of {accepted} or a torch.dtype; got {dtype!r}")


def resolve_device(device: str | torch.device | None, role: str = "model") -> torch.device:
    """``None`` picks CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidParameterError(
            f"device for {role} must be like 'cpu', 'cuda', 'cuda:1' or 'mps'; got {device!r} ({exc})"
        ) from None


def _resolve_source(spec: str | os.PathLike[str], dtype: torch.dtype | str) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` should look: (path-or-id, extra kwargs such as ``gguf_file``)."""
    from proxyalign import assets

    text = os.fspath(spec)
    asset_dtype = "bfloat16" if dtype in ("auto", torch.bfloat16) else str(dtype).removeprefix("torch.")
    cached = assets.resolve(text, asset_dtype)
    if cached is not None:
        return str(cached), {}
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json: not a transformers model directory (give the directory "
                "that save_pretrained wrote, or a .gguf file)"
            )
        return str(path), {}
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(f"model path {text!r} does not exist")
    return text, {}


def check_model_spec(
    spec: str | os.PathLike[str],
    *,
    role: str = "model",
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
) -> None:
    """Everything about loading a model that can be checked without reading its weights: the dtype, the
    device, and that a path exists and holds a model. Lets a caller fail before a minute of loading."""
    torch_dtype = resolve_dtype(dtype, role)
    if device is not None:
        where = resolve_device(device, role)
        if where.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParameterError(f"device for {role} is {device!r}, but CUDA is not available here")
    if not isinstance(spec, str | os.PathLike) or not os.fspath(spec).strip():
        raise InvalidParameterError(
            f"the {role} model must be a hub id, a path or an asset name, got {spec!r}"
        )
    _resolve_source(spec, torch_dtype)


def load_model(
    spec: str | os.PathLike[str],
    *,
    role: str = "model",
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, directory, ``.gguf`` file or offline asset.

    ``device_map`` (e.g. ``"auto"`` for a p spread over several GPUs) is passed to transformers and
    then ``device`` is ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, role)
    source, extra = _resolve_source(spec, torch_dtype)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, **extra}
    if revision is not None:
        common["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, **common}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(role, spec, exc) from exc
    if device_map is None:
        model = model.to(resolve_device(device, role))
    model.eval()
    upcast_wide_matmuls(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=os.fspath(spec))


def _load_error(role: str, spec: str | os.PathLike[str], exc: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"}
    hint = " (HF_HUB_OFFLINE is set: only local paths and cached models resolve)" if offline else ""
    return ModelLoadError(
        f"could not load the {role} model from {os.fspath(spec)!r}{hint}: {exc}. "
        "Give a hub id, a local model directory, a .gguf file, or an offline asset name "
        "(see `proxyalign models list`)."
    )


def _small_files(
    spec: str | os.PathLike[str], role: str, dtype: str | torch.dtype | None, trust_remote_code: bool
) -> tuple[str, dict[str, Any]]:
    source, extra = _resolve_source(spec, resolve_dtype(dtype, role))
    return source, {"trust_remote_code": trust_remote_code, **extra}


def peek_window(
    spec: str | os.PathLike[str],
    *,
    role: str = "model",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> int | None:
    """A model's context window from its config alone (no weights), so a command line can check its
    prompts before a minute of loading."""
    from transformers import AutoConfig

    source, common = _small_files(spec, role, dtype, trust_remote_code)
    try:
        return config_window(AutoConfig.from_pretrained(source, **common))
    except (OSError, ValueError) as exc:
        raise _load_error(role, spec, exc) from exc


def load_tokenizer(
    spec: str | os.PathLike[str],
    *,
    role: str = "model",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """A model's tokenizer without its weights."""
    from transformers import AutoTokenizer

    source, common = _small_files(spec, role, dtype, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        raise _load_error(role, spec, exc) from exc


def _describe_difference(name_a: str, vocab_a: dict[str, int], name_b: str, vocab_b: dict[str, int]) -> str:
    by_id_a = {i: t for t, i in vocab_a.items()}
    by_id_b = {i: t for t, i in vocab_b.items()}
    examples = []
    for token_id in sorted(set(by_id_a) | set(by_id_b)):
        token_a, token_b = by_id_a.get(token_id), by_id_b.get(token_id)
        if token_a != token_b:
            examples.append(f"id {token_id}: {name_a} has {token_a!r}, {name_b} has {token_b!r}")
            if len(examples) == 3:
                break
    return "; ".join(examples)


def check_same_vocabulary(tokenizers: Mapping[str, Any]) -> int:
    """Refuse models whose tokenizers differ; return the shared real vocabulary size.

    Checkpoints of one family pad their embedding matrices to different sizes, so we compare the
    tokenizers' own vocabularies (and later cut logits to that size), not the models' output widths.
    """
    items = list(tokenizers.items())
    first_name, first = items[0]
    first_vocab = first.get_vocab()
    for name, tokenizer in items[1:]:
        vocab = tokenizer.get_vocab()
        if vocab != first_vocab:
            detail = _describe_difference(first_name, first_vocab, name, vocab)
            raise TokenizerMismatchError(
                f"the {first_name} and {name} models do not share a vocabulary "
                f"({len(first_vocab)} vs {len(vocab)} tokens); first differences: {detail}. "
                "A hybrid needs models of one tokenizer family."
            )
    return real_vocab_size(first)


_GGUF_PADDING = re.compile(r"\[PAD\d+\]")


def real_vocab_size(tokenizer: Any) -> int:
    """Ids below this are real tokens; the rest are padding and must get zero probability.

    GGUF conversions fill the padded embedding rows with placeholder tokens named ``[PAD<id>]``
    (Qwen2.5: 151,665 real tokens, placeholders up to 151,935), so ``len(tokenizer)`` alone overcounts.
    """
    size = len(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    while size > 0 and _GGUF_PADDING.fullmatch(by_id.get(size - 1, "") or ""):
        size -= 1
    return size


def eos_token_ids(models: Mapping[str, Any], tokenizers: Mapping[str, Any]) -> frozenset[int]:
    """End-of-sequence ids of every model: generation configs and tokenizers together."""
    ids: set[int] = set()
    for model in models.values():
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
    for tokenizer in tokenizers.values():
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def context_window(model: Any) -> int | None:
    """Maximum sequence length a model was built for, when its config says."""
    return config_window(model.config)


def config_window(config: Any) -> int | None:
    """Maximum sequence length in a model config, when it says."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model: Any) -> torch.device:
    """Device of a model's input embeddings (where its input ids must go)."""
    return model.get_input_embeddings().weight.device

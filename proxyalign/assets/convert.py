"""GGUF de-quantization: load a verified GGUF with transformers once and save dense safetensors copies.

The only module that imports torch and transformers (lazily, inside the functions that use them), so
importing the package stays cheap; the converter is injectable so tests can skip the real work.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from proxyalign.assets.catalog import _DTYPE_BYTES, AssetError

Converter = Callable[[Path, Mapping[str, Path], bool, dict[str, float]], None]
"""Turns a verified GGUF into one saved model directory per dtype: (gguf, {dtype: dir}, progress, timings).

Injectable so tests can exercise download/assembly/caching without transformers doing real work.
"""


@contextlib.contextmanager
def _transformers_bars(progress: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when asked to, and restore the previous state."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()


def _make_serializable(model: Any) -> None:
    """Detach the GGUF quantizer so ``save_pretrained`` accepts the (already dense) model.

    Depending on the transformers version and architecture, a GGUF-loaded model may carry a
    ``GgufHfQuantizer`` and a ``quantization_config`` that make ``save_pretrained`` refuse; saving them
    would also make the reloaded model look quantized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own way (drops all of the below)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False


def _check_dense(model: Any, dtype: Any) -> None:
    """Refuse to save packed GGUF blocks as if they were weights: every parameter must be ``dtype``."""
    bad = [name for name, p in model.named_parameters() if p.dtype != dtype]
    packed = [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if bad or packed:
        raise AssetError(
            f"the GGUF model did not load fully de-quantized (e.g. {(bad or packed)[:3]}); this transformers "
            "version keeps GGUF weights packed for this architecture. Please report it with your versions."
        )


def _save(model: Any, tokenizer: Any, directory: Path) -> None:
    """Write the model (safetensors), its generation config and the tokenizer into ``directory``."""
    model.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)  # safetensors writes 0600; the cache is meant to be shared


def transformers_converter(
    gguf: Path, outputs: Mapping[str, Path], progress: bool, timings: dict[str, float]
) -> None:
    """De-quantize once, in the widest dtype asked for, and save every requested dtype from it.

    Casting the float32 de-quantized weights gives bit-identical bfloat16 weights to loading the GGUF
    directly in bfloat16 (checked with transformers 5.23), and loading the 1.5B takes about 40 s,
    so one load serves all dtypes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    order = sorted(outputs, key=lambda d: -_DTYPE_BYTES[d])
    with _transformers_bars(progress):
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=getattr(torch, order[0]),
            quantization_config=GgufConfig(dequantize=True),
        )
        model.eval()
        timings["load_dequantize"] = time.perf_counter() - start
        _make_serializable(model)
        for dtype in order:
            torch_dtype = getattr(torch, dtype)
            model.to(torch_dtype)
            _check_dense(model, torch_dtype)
            start = time.perf_counter()
            _save(model, tokenizer, outputs[dtype])
            timings[f"save_{dtype}"] = time.perf_counter() - start

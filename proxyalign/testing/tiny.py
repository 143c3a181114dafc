"""Tiny random models and a word-level tokenizer, for fast offline tests of anything built on the engine.

Used by proxyalign's own tests, the integration packages' tests and plugin authors' tests alike: a
:func:`tiny_aligner` decodes in milliseconds, needs no download, and exercises the real engine.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REAL_PAIR",
    "real_pair_dirs",
    "real_tokenizer",
    "save_tiny_pair",
    "tiny_aligner",
    "tiny_byte_aligner",
    "tiny_byte_tokenizer",
    "tiny_chat_aligner",
    "tiny_chat_model",
    "tiny_model",
    "tiny_tokenizer",
]

TINY_VOCAB = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
#: The offline model pair of `proxyalign models fetch qwen2.5-coder-pair` (base, aligned).
REAL_PAIR = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A whitespace word-level tokenizer: ids 0-3 are special, ``w4`` … ``w63`` are words.

    Text is words separated by spaces, e.g. ``"w5 w6 w7"``, so tests can write prompts by hand.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "</s>", "<pad>", "<s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), TINY_VOCAB - 6)})
    for i, role in enumerate(["<user>", "<assistant>", "<system>"], start=TINY_VOCAB - 6):
        vocab[role] = i
    vocab.update({"Q:": TINY_VOCAB - 3, "A:": TINY_VOCAB - 2, "\n": TINY_VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>", bos_token="<s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(
    seed: int,
    layers: int = 2,
    vocab_size: int = TINY_VOCAB,
    hidden: int = 32,
    scale: float = 4.0,
    window: int = 256,
) -> Any:
    """A random Mistral-architecture causal LM. ``scale`` sharpens its output distributions.

    Mistral rather than Qwen2 because transformers maps a saved Qwen2 checkpoint to its BPE tokenizer
    class, which would not reload our word-level test tokenizer from disk.

    ``vocab_size`` may exceed the tokenizer's to mimic checkpoints with padded embedding rows.
    """
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        eos_token_id=1,
        pad_token_id=2,
        bos_token_id=3,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    generator = torch.Generator().manual_seed(seed)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 2
    return model.eval()


def tiny_aligner(criterion: str = "dual_kad", small_base: bool = False, **kwargs: Any) -> Any:
    """A ProxyAligner over two (or three) tiny random models sharing :func:`tiny_tokenizer`."""
    from proxyalign.aligner import ProxyAligner

    return ProxyAligner(
        tiny_model(0, layers=2),
        tiny_model(1, layers=1),
        tiny_tokenizer(),
        small_base=tiny_model(2, layers=1) if small_base else None,
        criterion=criterion,
        **kwargs,
    )


@lru_cache(maxsize=1)
def tiny_byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges: 256 byte tokens, then ``<|im_end|>`` (EOS) and
    ``<|endoftext|>`` (padding). Any text is expressible, as grammar libraries assume of a vocabulary
    (the word-level :func:`tiny_tokenizer` is not), and distributions stay small enough (258 tokens)
    for statistical tests of constrained decoding to be fast and well conditioned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def tiny_byte_aligner(criterion: str = "dual_kad", small_base: bool = False, **kwargs: Any) -> Any:
    """A ProxyAligner over tiny random models on :func:`tiny_byte_tokenizer` (no download needed)."""
    from proxyalign.aligner import ProxyAligner

    tokenizer = tiny_byte_tokenizer()
    width = len(tokenizer)

    def model(seed: int, layers: int) -> Any:
        built = tiny_model(seed, layers=layers, vocab_size=width, scale=2.0)
        built.config.eos_token_id = built.generation_config.eos_token_id = tokenizer.eos_token_id
        built.config.pad_token_id = built.generation_config.pad_token_id = tokenizer.pad_token_id
        return built

    return ProxyAligner(
        model(20, 2),
        model(21, 1),
        tokenizer,
        small_base=model(22, 1) if small_base else None,
        criterion=criterion,
        **kwargs,
    )


#: Text that :func:`tiny_chat_model` favours: what JSON and tool calls are made of, and short words.
_FAVOURED = ['"', "}", "]", ",", " ", ":", "0", "1", "2", "3", "7", "a", "b", "x", "true", "<|im_end|>"]


@lru_cache(maxsize=1)
def real_tokenizer() -> Any:
    """The real pair's tokenizer (Qwen2.5's byte-level BPE, 151,665 tokens, a Hermes-style tool-calling
    chat template), or None when the pair has not been fetched (`make fetch`)."""
    dirs = real_pair_dirs()
    if dirs is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs[1])


def tiny_chat_model(seed: int, tokenizer: Any, layers: int = 1, bias: float = 14.0) -> Any:
    """A tiny random model over a real tokenizer's vocabulary, for tool-calling and structured-output
    tests: its output layer has a bias of ``bias`` towards a few tokens (quotes, braces, digits, short
    words, end of turn), so that under a JSON grammar it closes strings and objects within tens of
    tokens rather than wandering through 150k tokens. Still a real model: the engine runs it as any."""
    width = len(tokenizer)
    model = tiny_model(seed, layers=layers, vocab_size=width, scale=1.0, window=1024)  # room for tools
    head = torch.nn.Linear(model.config.hidden_size, width, bias=True)
    favoured = {i for text in _FAVOURED for i in tokenizer.encode(text, add_special_tokens=False)[:1]}
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[sorted(favoured)] = bias
    model.lm_head = head
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(
        "<|im_end|>"
    )
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def tiny_chat_aligner(criterion: str = "dual_kad", small_base: bool = False, **kwargs: Any) -> Any:
    """A ProxyAligner over tiny random models that use the real pair's tokenizer and chat template
    (:func:`tiny_chat_model`); None when the real pair has not been fetched."""
    from proxyalign.aligner import ProxyAligner

    tokenizer = real_tokenizer()
    if tokenizer is None:
        return None
    return ProxyAligner(
        tiny_chat_model(10, tokenizer, layers=2),
        tiny_chat_model(11, tokenizer),
        tokenizer,
        small_base=tiny_chat_model(12, tokenizer) if small_base else None,
        criterion=criterion,
        **kwargs,
    )


def save_tiny_pair(root: str | os.PathLike[str]) -> tuple[str, str]:
    """Save the tiny p and q* of :func:`tiny_aligner` with their tokenizer; returns (base, aligned) dirs.

    For tests of anything that loads models from disk (the CLI, ``from_pretrained``, adapters).
    """
    dirs = []
    for name, seed, layers in (("base", 0, 2), ("aligned", 1, 1)):
        path = Path(root) / name
        tiny_model(seed, layers).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        dirs.append(str(path))
    return dirs[0], dirs[1]


def real_pair_dirs(dtype: str = "bfloat16") -> tuple[Path, Path] | None:
    """Cached directories of the real offline pair, or None when it has not been fetched."""
    from proxyalign import assets

    try:
        dirs = tuple(assets.resolve(name, dtype) for name in REAL_PAIR)
    except Exception:
        return None
    if any(d is None or not Path(d).is_dir() for d in dirs):
        return None
    return dirs  # type: ignore[return-value]


def require_offline_hub() -> None:
    """Tests must never reach a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

"""Incremental detokenization (``proxyalign.engine.text``) against a full decode of the row.

The accumulator decodes only a window of recent tokens per step; what it shows must still equal a full
decode (less an incomplete last character) after every token, on the real tokenizer and on tokenizers
whose decoders look at a token's neighbours: SentencePiece's leading space, cleanup of spaces before
punctuation. The streamed pieces must add up to the final text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from proxyalign.engine.text import TextAccumulator
from proxyalign.testing import real_pair_dirs

CORPUS = [
    "def quicksort(xs): return xs if len(xs) < 2 else quicksort([x for x in xs[1:] if x < xs[0]])",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "naïve café déjà vu — 数学 问题 答案 🙂🚀 ½ ∑ x² “quoted” it's don't .",
    "    indented\n\tand tabbed\n\n  lines , with odd   spacing . and ! marks ?",
]


def full(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def check_against_full_decode(
    tokenizer: Any, ids: Sequence[int], rng: random.Random, *, streamable: bool = True
) -> None:
    """Feed ``ids`` in random chunks of 1-3; after each, the text equals the full decode's stable part
    (and, where a later token never rewrites earlier text, the streamed pieces add up to it)."""
    accumulator = TextAccumulator(tokenizer)
    pieces, fed = [], 0
    while fed < len(ids):
        step = rng.randint(1, 3)
        pieces.append(accumulator.add(ids[fed : fed + step]))
        fed = min(fed + step, len(ids))
        assert accumulator.text == full(tokenizer, ids[:fed]).rstrip("\ufffd"), f"after {fed} tokens"
    pieces.append(accumulator.finish())
    assert accumulator.text == full(tokenizer, ids)
    assert "".join(pieces) == accumulator.text or not streamable


def sequences(tokenizer: Any, rng: random.Random, count: int) -> list[list[int]]:
    """Encoded corpus lines, the same with a few tokens swapped at random, and uniform random ids."""
    vocab = len(tokenizer)
    out = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in CORPUS]
    for ids in list(out):
        mutated = list(ids)
        for _ in range(len(mutated) // 4):
            mutated[rng.randrange(len(mutated))] = rng.randrange(vocab)
        out.append(mutated)
    out += [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(count)]
    return out


def metaspace_tokenizer() -> Any:
    """A small SentencePiece-style BPE (``▁`` marks a word's leading space, dropped at the text's start),
    trained here on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    backend.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def cleanup_tokenizer() -> Any:
    """Words and punctuation whose decode removes the space before ``.``, ``,``, ``'s``, ``n't`` ...:
    a token's text depends on the next one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "it", "do", "is", "done", ".", ",", "!", "?", "'s", "n't", "'m", "'ve", "'re"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", clean_up_tokenization_spaces=True
    )


def rewriting_tokenizer() -> Any:
    """A decoder that rewrites earlier text by what follows ("a" then "b" reads "X"): the window's text
    no longer extends what it showed, so the accumulator must fall back to a full decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "a", "b", "c", "ab"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("make", [metaspace_tokenizer, cleanup_tokenizer, rewriting_tokenizer])
def test_windowed_decoding_equals_a_full_decode_where_neighbours_matter(make):
    tokenizer = make()
    rng = random.Random(0)
    for ids in sequences(tokenizer, rng, count=200):
        check_against_full_decode(tokenizer, ids, rng, streamable=make is not rewriting_tokenizer)


@pytest.mark.real_weights
def test_windowed_decoding_equals_a_full_decode_on_the_real_tokenizer():
    """Qwen's byte-level BPE: multi-byte characters split over tokens, special tokens (skipped) anywhere."""
    from transformers import AutoTokenizer

    dirs = real_pair_dirs()
    if dirs is None:
        pytest.skip("the real pair is not fetched (make fetch)")
    tokenizer = AutoTokenizer.from_pretrained(dirs[1])
    rng = random.Random(0)
    specials = sorted(tokenizer.all_special_ids)
    cases = sequences(tokenizer, rng, count=300)
    for ids in cases[: len(CORPUS)]:
        spiked = list(ids)
        for _ in range(3):
            spiked.insert(rng.randrange(len(spiked) + 1), rng.choice(specials))
        cases.append(spiked)
    for ids in cases:
        check_against_full_decode(tokenizer, ids, rng)


def test_a_long_row_decodes_a_short_window_per_token():
    """The point of the window: per token, the tokenizer sees a few ids, not the whole row."""
    tokenizer = metaspace_tokenizer()
    ids = tokenizer(" ".join(CORPUS * 20), add_special_tokens=False)["input_ids"]
    seen: list[int] = []
    decode = tokenizer.decode

    def counting(token_ids: Sequence[int], **kwargs: Any) -> str:
        seen.append(len(token_ids))
        return decode(token_ids, **kwargs)

    tokenizer.decode = counting
    accumulator = TextAccumulator(tokenizer)
    for token in ids:
        accumulator.add([token])
    assert len(ids) > 500 and max(seen) < 20
    tokenizer.decode = decode
    assert accumulator.text == full(tokenizer, ids).rstrip("\ufffd")

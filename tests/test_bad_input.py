"""Bad input: a clear error naming the parameter and the accepted values, and no state left behind."""

from __future__ import annotations

import pytest
import torch

import proxyalign
from proxyalign.errors import (
    CriterionError,
    InvalidParameterError,
    ModelLoadError,
    TokenizerMismatchError,
    UnknownCriterionError,
)
from proxyalign.testing import tiny_model, tiny_tokenizer

PROMPT = "w5 w6 w7"


class Broken(proxyalign.Criterion):
    """Returns whatever ``mode`` says; used to check that invalid output stops generation."""

    name = "broken"
    reads = frozenset({"p", "q_star"})

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def rejection(self, p, q_star=None, q=None):
        if self.mode == "nan":
            return torch.full_like(p, float("nan"))
        if self.mode == "shape":
            return p[:, :-1]
        if self.mode == "range":
            return torch.full_like(p, 1.5)
        if self.mode == "lazy-nan":
            return torch.full_like(p, float("nan"))
        return torch.zeros_like(p)


class BrokenLazy(Broken):
    name = "broken_lazy"
    reads = frozenset({"p"})


@pytest.mark.parametrize(
    ("criterion", "fragment"),
    [
        (Broken("nan"), "returned invalid mu"),
        (Broken("shape"), "returned mu of shape"),
        (Broken("range"), "finite range [1.5, 1.5]"),
        (BrokenLazy("nan"), "NaN value"),
    ],
)
def test_invalid_criterion_output_stops_generation_and_names_it(aligner, criterion, fragment):
    with pytest.raises(CriterionError) as info:
        aligner.generate([PROMPT, "w9"], max_new_tokens=5, seed=0, criterion=criterion)
    message = str(info.value)
    assert fragment in message and criterion.name in message and "package" in message
    # Nothing is left behind: the next call behaves exactly as on a fresh aligner.
    after = aligner.generate(PROMPT, max_new_tokens=6, seed=1, criterion="confidence_bet")[0]
    fresh = proxyalign.testing.tiny_aligner("confidence_bet").generate(PROMPT, max_new_tokens=6, seed=1)[0]
    assert after.token_ids == fresh.token_ids


def test_unknown_criterion_per_call(aligner):
    with pytest.raises(UnknownCriterionError, match=r"available: .*confidence_bet"):
        aligner.generate(PROMPT, criterion="no_such_rule")


def test_bad_parameter_value_per_call(aligner):
    with pytest.raises(InvalidParameterError, match=r"'margin' must be a number in \[0, 1\], got -1"):
        aligner.generate(PROMPT, criterion="confidence_bet", criterion_params={"margin": -1})


def test_implicit_reward_without_small_base(aligner):
    with pytest.raises(InvalidParameterError, match="needs the small base model q"):
        aligner.generate(PROMPT, criterion="implicit_reward")
    with pytest.raises(InvalidParameterError, match="needs the small base model q"):
        proxyalign.ProxyAligner(tiny_model(0), tiny_model(1), tiny_tokenizer(), criterion="implicit_reward")
    with pytest.raises(InvalidParameterError, match=r"small_base=\.\.\."):
        proxyalign.ProxyAligner.from_pretrained("unused-base", "unused-aligned", criterion="implicit_reward")


@pytest.mark.parametrize("prompt", ["", "   ", [], [[]]])
def test_empty_prompt(aligner, prompt):
    with pytest.raises(InvalidParameterError, match="empty"):
        aligner.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "8"])
def test_max_new_tokens_must_be_positive_int(aligner, value):
    with pytest.raises(InvalidParameterError, match="max_new_tokens must be an integer >= 1"):
        aligner.generate(PROMPT, max_new_tokens=value)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"criterion_on": "sharp"}, "criterion_on must be 'scaled' or 'raw'"),
        ({"mode": "warp"}, "mode must be one of"),
        ({"stop": [1, 2]}, "stop must be a string or a list of non-empty strings"),
        ({"temprature": 0.5}, r"unknown generation option\(s\) \['temprature'\]"),
    ],
)
def test_bad_generation_options(aligner, options, fragment):
    with pytest.raises(InvalidParameterError, match=fragment):
        aligner.generate(PROMPT, max_new_tokens=2, **options)


def test_prompt_longer_than_context_window(aligner):
    long_prompt = " ".join(["w5"] * 250)
    with pytest.raises(InvalidParameterError, match="exceeds its context window of 256"):
        aligner.generate(long_prompt, max_new_tokens=10)


def test_tokenizers_that_differ_are_refused_with_where():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(tiny_tokenizer().get_vocab())
    vocab["w7x"] = vocab.pop("w7")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(TokenizerMismatchError, match=r"id 7: base has 'w7', aligned has 'w7x'"):
        proxyalign.ProxyAligner(tiny_model(0), tiny_model(1), tiny_tokenizer(), tokenizers={"aligned": other})


def test_model_narrower_than_tokenizer_is_refused():
    with pytest.raises(InvalidParameterError, match="predicts 32 ids but the tokenizer has 64"):
        proxyalign.ProxyAligner(tiny_model(0, vocab_size=32), tiny_model(1), tiny_tokenizer())


def test_unresolvable_model_fails_fast_offline(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the base model from 'nobody/no-such-model'"):
        proxyalign.ProxyAligner.from_pretrained("nobody/no-such-model", "nobody/other", criterion="base")
    with pytest.raises(ModelLoadError, match="does not exist"):
        proxyalign.ProxyAligner.from_pretrained(str(tmp_path / "missing.gguf"), str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        proxyalign.ProxyAligner.from_pretrained(str(tmp_path), str(tmp_path))


def test_bad_prompt_format_and_roles():
    with pytest.raises(
        InvalidParameterError, match="prompt format for 'base' must be one of auto, plain, chat"
    ):
        proxyalign.testing.tiny_aligner(prompt_formats={"base": "markdown"})
    pa = proxyalign.testing.tiny_aligner()
    with pytest.raises(InvalidParameterError, match=r"unknown model role\(s\) \['large'\]"):
        pa.generate({"large": "w5"}, max_new_tokens=2)


def test_bad_dtype_and_device_names():
    from proxyalign.models import resolve_device, resolve_dtype

    with pytest.raises(InvalidParameterError, match="dtype for base must be one of auto, float32"):
        resolve_dtype("float8", "base")
    with pytest.raises(InvalidParameterError, match="device for aligned must be like 'cpu'"):
        resolve_device("gpu-please", "aligned")

"""End to end on real weights: the offline Qwen2.5-Coder pair (1.5B as p, 0.5B as q*), bf16, CPU.

`make test` fetches the pair first (`proxyalign models fetch qwen2.5-coder-pair`); without it these
tests are skipped with that instruction.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

import proxyalign
from proxyalign.testing import real_pair_dirs

pytestmark = pytest.mark.real_weights

QUESTION = "Write a Python function that returns the square of a number."


@pytest.fixture(scope="module")
def pair():
    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        pytest.skip("real pair not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
    return proxyalign.ProxyAligner.from_pretrained(
        str(dirs[0]),
        str(dirs[1]),
        dtype="bfloat16",
        device="cpu",
        criterion="confidence_bet",
        prompt_formats={"base": "plain", "aligned": "chat"},
    )


def test_vocabulary_is_shared_and_padding_is_excluded(pair):
    assert pair.vocab_size == 151_665  # GGUF [PAD…] placeholders after this get zero mass
    assert 151645 in pair.eos_token_ids


@pytest.mark.parametrize(
    ("criterion", "params"), [("confidence_bet", {"margin": 0.1}), ("dual_kad", {"threshold": 0.3})]
)
def test_hybrid_generates_with_consistent_provenance(pair, criterion, params):
    prompt = {"base": f"# {QUESTION}\ndef", "aligned": QUESTION}
    gens = pair.generate(
        [prompt, prompt],
        max_new_tokens=20,
        temperature=0.7,
        seed=0,
        criterion=criterion,
        criterion_params=params,
    )
    for g in gens:
        s = g.stats
        assert s.new_tokens >= 16 or g.finish_reason != proxyalign.FinishReason.LENGTH
        assert len(g.token_ids) == len(g.sources) == s.new_tokens
        assert s.tokens_from_base + s.tokens_from_aligned == s.new_tokens
        assert s.rejected_drafts == s.tokens_from_aligned == g.sources.count(proxyalign.Source.ALIGNED)
        assert max(g.token_ids) < pair.vocab_size
        assert g.text.strip()
    if criterion == "dual_kad":  # lazy: q* ran only when needed
        assert gens[0].stats.aligned_forwards <= gens[0].stats.base_forwards


def test_greedy_base_equals_hf_generate_on_p(pair):
    prompt = "def fibonacci(n):\n"
    ours = pair.generate(prompt, max_new_tokens=16, temperature=0, criterion="base")[0]
    ids = pair.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = pair.models["base"].generate(ids, max_new_tokens=16, do_sample=False)
    assert ours.token_ids == out[0, ids.shape[1] :].tolist()[: len(ours.token_ids)]
    assert len(ours.token_ids) == 16


def test_streaming_on_real_weights_matches_generate(pair):
    chunks = list(pair.stream(QUESTION, max_new_tokens=12, seed=3, criterion="confidence_bet"))
    final = chunks[-1].generation
    assert "".join(c.text for c in chunks) == final.text
    direct = pair.generate(QUESTION, max_new_tokens=12, seed=3, criterion="confidence_bet")[0]
    assert direct.token_ids == final.token_ids


def test_a_request_joining_a_running_batch_decodes_as_alone():
    """Continuous batching on real weights: B joins while A is decoding (different prompt widths for p
    and q*, so caches and queues are padded on join); greedy, each gives its tokens alone. float32, so
    the padding's different summation order cannot flip an argmax."""
    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        pytest.skip("real pair not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
    pa = proxyalign.ProxyAligner.from_pretrained(
        str(dirs[0]), str(dirs[1]), dtype="float32", device="cpu", criterion="confidence_bet"
    )
    try:
        first = {"base": f"# {QUESTION}\ndef", "aligned": QUESTION}
        second = {
            "base": "Question: A farmer has 3 fields of 12 cows each. How many cows?\nAnswer:",
            "aligned": [{"role": "user", "content": "A farmer has 3 fields of 12 cows each. How many cows?"}],
        }
        options = {"max_new_tokens": 16, "temperature": 0}
        alone = [pa.generate(prompt, **options)[0].token_ids for prompt in (first, second)]
        tokens: list[int] = []
        started = threading.Event()

        def run_first() -> None:
            for chunk in pa.stream(first, **options):
                tokens.extend(chunk.token_ids)
                if len(tokens) >= 4:
                    started.set()
            started.set()

        thread = threading.Thread(target=run_first)
        thread.start()
        assert started.wait(120)
        joined = pa.generate(second, **options)[0].token_ids
        thread.join(120)
        assert len(alone[0]) > 4, "A must still be decoding when B joins"
        assert tokens == alone[0]
        assert joined == alone[1]
    finally:
        pa.close()


def test_a_schema_constrained_answer_parses_and_a_forced_call_names_its_tool(pair):
    """Structured output and a forced tool call through the hybrid on real weights, speculative mode
    (drafts advance the grammar, rejected ones roll back)."""
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "integer"},
            "steps": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3},
        },
        "required": ["answer", "steps"],
        "additionalProperties": False,
    }
    question = [
        {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples? Answer in JSON."}
    ]
    (gen,) = pair.generate(
        [question],
        max_new_tokens=120,
        temperature=0,
        mode="speculative",
        response_format={"type": "json_schema", "json_schema": {"name": "solution", "schema": schema}},
    )
    value = json.loads(gen.text)
    assert set(value) == {"answer", "steps"} and isinstance(value["answer"], int)
    calculator = {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }
    (call,) = pair.generate(
        [question], max_new_tokens=60, temperature=0, tools=[calculator], tool_choice="calculator"
    )
    assert [c.name for c in call.tool_calls] == ["calculator"] and call.content == ""
    assert set(call.tool_calls[0].parsed_arguments) == {"expression"}


def test_wide_float32_prefill_keeps_p_s_next_token_distribution(pair):
    """p's logits after a real prompt, its prefill's linear layers in bf16 and then in float32 (as on a
    host that emulates bf16): the same next-token distribution up to bf16 rounding."""
    from proxyalign.precision import upcast_wide_matmuls

    model = pair.models["base"]
    ids = pair.tokenizer(f"# {QUESTION}\ndef", return_tensors="pt").input_ids
    assert ids.shape[1] >= 8
    keys = ("forward", "float32_from_rows")
    as_loaded = {
        module: {k: vars(module)[k] for k in keys if k in vars(module)} for module in model.modules()
    }

    def next_token_logprobs(from_rows: int) -> torch.Tensor:
        upcast_wide_matmuls(model, rows=from_rows)
        return torch.log_softmax(model(input_ids=ids, logits_to_keep=1).logits[0, -1].float(), -1)

    with torch.inference_mode():
        try:
            bf16, wide = next_token_logprobs(10**9), next_token_logprobs(8)
        finally:  # the module's pair is shared with the other tests: back to how it was loaded
            for module, saved in as_loaded.items():
                for key in keys:
                    vars(module).pop(key, None)
                vars(module).update(saved)
    total_variation = 0.5 * (bf16.exp() - wide.exp()).abs().sum().item()
    assert total_variation < 0.05, total_variation
    assert bf16.argmax() == wide.argmax()

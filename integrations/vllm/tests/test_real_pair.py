"""The real offline pair (Qwen2.5-Coder 1.5B p, 0.5B q*) in vLLM, float32: log pi over the whole
151,936-row output layer equals proxyalign's from the transformers models, step by step."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from proxyalign.testing import real_pair_dirs
from vllm import SamplingParams

from proxyalign_vllm.testing import full_logprobs, load_hf_models, reference_log_pi

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
STEPS = 3


def test_real_pair_log_pi_equals_proxyalign(engine_factory: Any) -> None:
    from transformers import AutoTokenizer

    dirs = real_pair_dirs()
    assert dirs is not None
    base, aligned = (str(d) for d in dirs)
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    messages = [
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}
    ]
    prompt = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    )

    llm = engine_factory(base=base, aligned=aligned, criterion="dual_kad", max_model_len=512, seed=0)
    width = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=STEPS, logprobs=-1, seed=1, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    got = torch.stack([full_logprobs(step, width) for step in output.logprobs])
    llm.llm_engine.engine_core.shutdown()  # the HF models need the memory
    gc.collect()

    vocab = 151_665  # Qwen2.5's real tokens; rows up to 151,936 are padding
    sequence = prompt + list(output.token_ids)
    positions = range(len(prompt) - 1, len(sequence) - 1)
    want = reference_log_pi(
        load_hf_models({"base": base, "aligned": aligned}), "dual_kad", {}, sequence, positions, vocab
    ).double()
    assert got[:, vocab:].isinf().all()
    real = got[:, :vocab]
    assert torch.equal(real.isinf(), want.isinf())
    finite = want.isfinite()
    gap = (real[finite] - want[finite]).abs().max().item()
    tv = 0.5 * (real.exp() - want.exp()).abs().sum(-1).max().item()
    print(f"real pair: max |log pi gap| = {gap:.2e}, max total variation = {tv:.2e}")
    assert tv < 1e-4 and gap < 1e-3, (gap, tv)

"""The hybrid sharded over two tensor-parallel ranks (two CPU processes), with the engine's own
temperature, top-k and top-p: log pi still equals proxyalign's."""

from __future__ import annotations

from typing import Any

import pytest
from proxyalign.engine.sampling import SamplingConfig
from vllm import SamplingParams

import proxyalign_vllm
from proxyalign_vllm.testing import TINY_PADDED_VOCAB, TINY_REAL_VOCAB, full_logprobs, reference_log_pi

PROMPT = [3, 9, 8, 7, 6, 5]
SAMPLING = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, criterion_on="raw")


@pytest.fixture(scope="module")
def llm(engine_factory: Any, tiny_dirs: dict[str, str]) -> Any:
    return engine_factory(
        base=tiny_dirs["base"],
        aligned=tiny_dirs["aligned"],
        small_base=tiny_dirs["small_base"],
        criterion="confidence_bet",
        temperature=SAMPLING.temperature,
        top_k=SAMPLING.top_k,
        top_p=SAMPLING.top_p,
        criterion_on=SAMPLING.criterion_on,
        tensor_parallel_size=2,
        seed=0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["confidence_bet", "implicit_reward"])
def test_tensor_parallel_log_pi_equals_proxyalign(
    llm: Any, hf_models: dict[str, Any], criterion: str
) -> None:
    proxyalign_vllm.set_criterion(llm, criterion)
    params = SamplingParams(max_tokens=5, logprobs=-1, seed=3, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0]
    got = [full_logprobs(step, TINY_PADDED_VOCAB) for step in output.logprobs]
    sequence = PROMPT + list(output.token_ids)
    positions = range(len(PROMPT) - 1, len(sequence) - 1)
    want = reference_log_pi(hf_models, criterion, {}, sequence, positions, TINY_REAL_VOCAB, SAMPLING)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g[TINY_REAL_VOCAB:].isinf().all()
        real = g[:TINY_REAL_VOCAB]
        assert (real.isinf() == w.isinf()).all(), (
            f"step {step}: support differs (top-k/top-p applied per model)"
        )
        finite = w.isfinite()
        assert (real[finite] - w.double()[finite]).abs().max() <= 1e-5, f"step {step}"
        assert finite.sum() < TINY_REAL_VOCAB  # the filters did cut pi's support

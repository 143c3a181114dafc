"""One tiny hybrid engine (p, q*, q) in vLLM: log pi equals proxyalign's for every built-in criterion,
samples follow it, and requests that would reshape it are refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from proxyalign.errors import InvalidParameterError
from scipy.stats import chisquare
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

import proxyalign_vllm
from proxyalign_vllm.testing import TINY_PADDED_VOCAB, TINY_REAL_VOCAB, full_logprobs, reference_log_pi

PROMPT = [3, 5, 6, 7, 8, 9]  # "<s> w5 w6 w7 w8 w9" in the tiny word-level tokenizer
WIDTH = TINY_PADDED_VOCAB  # p's padded output layer
STEPS = 6
#: Every built-in criterion, some with non-default parameters (they must reach the model).
BUILTIN_CRITERIA: list[tuple[str, dict[str, Any]]] = [
    ("dual_kad", {}),
    ("dual_kad", {"threshold": 0.2}),
    ("primal_kad", {"alpha": 0.3}),
    ("confidence_bet", {}),
    ("nudging", {"threshold": 0.5}),
    ("implicit_reward", {}),
    ("base", {}),
    ("aligned", {}),
]


@pytest.fixture(scope="module")
def llm(engine_factory: Any, tiny_dirs: dict[str, str]) -> Any:
    return engine_factory(
        base=tiny_dirs["base"],
        aligned=tiny_dirs["aligned"],
        small_base=tiny_dirs["small_base"],
        criterion="dual_kad",
        seed=0,
    )


def generated_log_pi(llm: Any, steps: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """A sampled continuation of PROMPT and vLLM's full log pi at each of its steps."""
    params = SamplingParams(max_tokens=steps, logprobs=-1, seed=seed, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0]
    return list(output.token_ids), torch.stack([full_logprobs(step, WIDTH) for step in output.logprobs])


def assert_same_log_pi(vllm_log_pi: torch.Tensor, reference: torch.Tensor, atol: float = 1e-5) -> None:
    real = vllm_log_pi[:, :TINY_REAL_VOCAB]
    assert torch.isinf(vllm_log_pi[:, TINY_REAL_VOCAB:]).all(), "padded ids must have pi = 0"
    assert torch.equal(torch.isinf(real), torch.isinf(reference)), "pi's support differs"
    finite = torch.isfinite(reference)
    gap = (real[finite] - reference.double()[finite]).abs().max().item()
    assert gap <= atol, f"max |log pi(vLLM) - log pi(proxyalign)| = {gap:.2e}"


@pytest.mark.parametrize(("criterion", "params"), BUILTIN_CRITERIA, ids=lambda v: str(v) if v else "")
def test_log_pi_equals_proxyalign(
    llm: Any, hf_models: dict[str, Any], criterion: str, params: dict[str, Any]
) -> None:
    proxyalign_vllm.set_criterion(llm, criterion, params)
    tokens, log_pi = generated_log_pi(llm, STEPS, seed=hash(criterion) % 1000)
    sequence = PROMPT + tokens
    positions = range(len(PROMPT) - 1, len(sequence) - 1)
    reference = reference_log_pi(hf_models, criterion, params, sequence, positions, TINY_REAL_VOCAB)
    assert_same_log_pi(log_pi, reference)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["dual_kad", "implicit_reward"])
def test_first_tokens_follow_pi(llm: Any, hf_models: dict[str, Any], criterion: str) -> None:
    draws = 1500
    proxyalign_vllm.set_criterion(llm, criterion)
    params = SamplingParams(n=draws, max_tokens=1, seed=7, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outputs]), minlength=WIDTH).double()
    positions = [len(PROMPT) - 1]
    pi = reference_log_pi(hf_models, criterion, {}, PROMPT, positions, TINY_REAL_VOCAB)[0].exp().double()
    assert counts[TINY_REAL_VOCAB:].sum() == 0 and counts[:TINY_REAL_VOCAB][pi == 0].sum() == 0
    expected = pi * draws
    rare = expected < 5  # pooled into one cell, so that the chi-square approximation holds
    observed = torch.cat([counts[:TINY_REAL_VOCAB][~rare], counts[:TINY_REAL_VOCAB][rare].sum().view(1)])
    expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    result = chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item())
    assert result.pvalue > 1e-3, f"{criterion}: chi-square p = {result.pvalue:.2e} over {len(expected)} cells"


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.7},
        {"temperature": 0.0},
        {"top_p": 0.9},
        {"top_k": 5},
        {"min_p": 0.1},
        {"repetition_penalty": 1.2},
        {"logit_bias": {5: 3.0}},
        {"min_tokens": 2},
    ],
    ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()),
)
def test_requests_that_reshape_pi_are_refused(llm: Any, params: dict[str, Any]) -> None:
    with pytest.raises(
        VLLMValidationError, match="proxyalign hybrid samples pi as the engine was configured"
    ):
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=4, **params), use_tqdm=False)


def test_set_criterion_validates_before_the_workers(llm: Any) -> None:
    with pytest.raises(InvalidParameterError, match="threshold"):
        proxyalign_vllm.set_criterion(llm, "dual_kad", {"threshold": 7})
    assert proxyalign_vllm.set_criterion(llm, "nudging", {"threshold": 0.3}) == {"threshold": 0.3}
    assert math.isfinite(generated_log_pi(llm, 1, seed=0)[1][0, 5].item())

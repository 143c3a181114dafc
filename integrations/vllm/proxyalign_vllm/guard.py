"""Refuse request settings that would reshape pi after the model has computed it.

The hybrid applies temperature and top-k/top-p per model, inside the model (p's and q*'s
distributions are tempered and filtered before the criterion reads them, as in proxyalign's engine),
so the logits vLLM samples from are already log pi. Anything vLLM's sampler would apply on top
(temperature, filters, penalties, biases, masks) would sample some other distribution; vLLM runs every
logits processor's ``validate_params`` at request admission, which is where we can say so.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

__all__ = ["HybridRequestGuard", "request_problems"]


def request_problems(params: Any) -> list[str]:
    """What in a request's ``SamplingParams`` would change the distribution the hybrid defines."""
    problems = []
    if params.temperature != 1.0:
        problems.append(f"temperature={params.temperature} (the engine's temperature applies; send 1)")
    if params.top_p < 1.0:
        problems.append(f"top_p={params.top_p}")
    if params.top_k not in (0, -1):
        problems.append(f"top_k={params.top_k}")
    if params.min_p > 0:
        problems.append(f"min_p={params.min_p}")
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(params, name) != neutral:
            problems.append(f"{name}={getattr(params, name)}")
    for name in ("logit_bias", "allowed_token_ids", "bad_words", "structured_outputs"):
        if getattr(params, name, None):
            problems.append(f"{name} (it would mask pi after the criterion has read the unmasked models)")
    if params.min_tokens:
        problems.append(f"min_tokens={params.min_tokens} (it masks end-of-sequence tokens out of pi)")
    return problems


class HybridRequestGuard(LogitsProcessor):
    """A logits processor that changes nothing: it exists for its admission check."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        problems = request_problems(sampling_params)
        if problems:  # VLLMValidationError: the OpenAI server answers HTTP 400 with it
            raise VLLMValidationError(
                "the proxyalign hybrid samples pi as the engine was configured (temperature, top_k, top_p "
                "and criterion are set in proxyalign_vllm.engine_args); this request also sets "
                + "; ".join(problems)
            )

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

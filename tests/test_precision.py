"""Wide bf16 matmuls in float32 (proxyalign/precision.py): same results, only where installed.

The speed-up itself is a property of the host (``benchmarks/matmul_paths.py``, performance.md); what
is tested here is that the float32 path computes what the bf16 path does, that it applies from the
threshold on, and that it is installed only on bf16 CPU layers, never on the output layer, and not
when turned off.
"""

from __future__ import annotations

import pytest
import torch

import proxyalign
from proxyalign.precision import float32_rows, upcast_wide_matmuls
from proxyalign.testing import tiny_model, tiny_tokenizer


def bf16_model(seed: int = 0):
    return tiny_model(seed, layers=2, hidden=64).to(torch.bfloat16)


def patched(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if "forward" in vars(module)]


def test_float32_path_computes_what_bf16_computes_from_the_threshold_on():
    plain, wide = bf16_model(), bf16_model()
    assert upcast_wide_matmuls(wide, rows=8) == 8
    ids = torch.randint(10, 40, (2, 6))  # 12 rows per linear call: float32 path
    with torch.inference_mode():
        expected, got = plain(input_ids=ids).logits.float(), wide(input_ids=ids).logits.float()
    # both multiply the same bf16 values and accumulate in float32; outputs are rounded to bf16
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02), (got - expected).abs().max()
    calls = []
    layer = patched(wide)[0]
    layer.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    with torch.inference_mode():
        wide(input_ids=ids)
    assert calls == [torch.bfloat16], "the float32 result goes back to the model's dtype"


def test_calls_below_the_threshold_are_untouched_bf16():
    plain, wide = bf16_model(), bf16_model()
    upcast_wide_matmuls(wide, rows=64)
    ids = torch.randint(10, 40, (1, 5))
    with torch.inference_mode():
        assert torch.equal(plain(input_ids=ids).logits, wide(input_ids=ids).logits)


def test_installed_on_bf16_layers_but_not_the_output_layer():
    model = bf16_model()
    upcast_wide_matmuls(model, rows=8)
    layers = patched(model)
    assert layers and all(isinstance(layer, torch.nn.Linear) for layer in layers)
    assert model.get_output_embeddings() not in layers
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == len(linears) - 1


def test_nothing_installed_on_float32_weights_or_when_turned_off(monkeypatch):
    assert upcast_wide_matmuls(tiny_model(0), rows=8) is None
    monkeypatch.setenv("PROXYALIGN_WIDE_FLOAT32", "0")
    model = bf16_model()
    assert upcast_wide_matmuls(model) is None and not patched(model)


def test_a_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="rows must be >= 1"):
        upcast_wide_matmuls(bf16_model(), rows=0)


def test_the_measured_threshold_is_a_candidate_or_none_and_kept():
    first = float32_rows(256, 128, torch.get_num_threads())
    assert first is None or first in (8, 16, 32, 64, 128)
    assert float32_rows(256, 128, torch.get_num_threads()) == first  # measured once


def test_the_hybrid_decodes_the_same_with_wide_float32():
    """Greedy hybrid decoding of a bf16 pair: the prompt's prefill (12 rows) in float32 changes nothing
    the sampler sees beyond bf16 rounding, so greedy tokens agree."""
    texts = []
    for rows in (None, 4):
        base, aligned = bf16_model(0), bf16_model(1)
        if rows:
            for model in (base, aligned):
                upcast_wide_matmuls(model, rows=rows)
        pa = proxyalign.ProxyAligner(base, aligned, tiny_tokenizer(), criterion="dual_kad")
        (out,) = pa.generate("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", max_new_tokens=8, temperature=0)
        texts.append(out.text)
    assert texts[0] == texts[1]


def test_wide_calls_work_in_and_out_of_inference_mode_and_under_autograd():
    """The scratch buffer is first made inside the engine's inference mode; HF ``generate`` (no_grad)
    and training (autograd) must still run on the same model afterwards, in any order."""
    import threading

    plain, wide = bf16_model(), bf16_model()
    upcast_wide_matmuls(wide, rows=8)
    ids = torch.randint(10, 40, (2, 6))
    failures: list[BaseException] = []

    def fresh_thread() -> None:  # a new thread: its scratch buffer does not exist yet
        try:
            with torch.inference_mode():
                wide(input_ids=ids)
            with torch.no_grad():
                expected, got = plain(input_ids=ids).logits.float(), wide(input_ids=ids).logits.float()
            assert torch.allclose(got, expected, atol=0.05, rtol=0.02)
            wide(input_ids=ids).logits.float().sum().backward()
            assert all(p.grad is not None for p in wide.parameters() if p.requires_grad)
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert not failures, failures[0]

"""p's forward passes with its bf16 linear layers as loaded vs wide calls in float32, side by side.

    python benchmarks/wide_float32.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/wide_float32.py   # an AVX2-only host

On a CPU that emulates bf16 (AVX2 only), proxyalign computes linear calls of many rows in float32
(proxyalign/precision.py). This times the real 1.5B p over the shapes decoding uses (a prompt's
prefill, batched prefill, a token step and a gamma-4 verification at batch 1 and 8), once with every
call in bf16 and once with the host's threshold installed, alternating, fastest of ``--reps`` each.
With native bf16 the threshold is none and the two columns are the same path.
"""

from __future__ import annotations

import argparse
import time

import torch
from host import describe_host

from proxyalign.models import load_model
from proxyalign.precision import upcast_wide_matmuls
from proxyalign.testing import real_pair_dirs

SHAPES = ((1, 170), (8, 60), (1, 1), (1, 5), (8, 1), (8, 5))  # rows x positions


def seconds(model, ids: torch.Tensor, reps: int) -> float:
    model(input_ids=ids, logits_to_keep=1)  # warm-up
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=None, help="float32 from N rows (default: measured)")
    args = parser.parse_args()
    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        raise SystemExit("fetch the pair first: proxyalign models fetch qwen2.5-coder-pair")
    torch.set_grad_enabled(False)
    print(describe_host(), flush=True)
    model = load_model(str(dirs[0]), role="base", dtype="bfloat16", device="cpu").model
    threshold = args.rows or upcast_wide_matmuls(model)  # measured as at load, from p's widest layer
    print(f"threshold: {threshold or 'none (float32 never faster: both columns bf16)'}\n")
    print("| rows x positions | all bf16 s | wide in float32 s | speed-up |")
    print("|---|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for rows, positions in SHAPES:
        ids = torch.randint(1000, 100_000, (rows, positions), generator=generator)
        upcast_wide_matmuls(model, rows=10**9)
        plain = seconds(model, ids, args.reps)
        upcast_wide_matmuls(model, rows=threshold or 10**9)
        wide = seconds(model, ids, args.reps)
        print(f"| {rows} x {positions} | {plain:.3f} | {wide:.3f} | {plain / wide:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""How long one of p's linear layers takes for 1..N rows, in bf16 and float32, on this host's CPU path.

    python benchmarks/matmul_paths.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/matmul_paths.py   # an AVX2-only host

Speculative decoding pays off when p verifying gamma+1 positions costs about what one position costs
(the weights are read once either way). This measures that ratio where it is decided: one MLP
projection of the 1.5B p (1536 -> 8960), for as many rows as a verification or a batch has. With the
two variables above, oneDNN and ATen restrict themselves to AVX2, so this host behaves like one without
AVX-512 bf16 or AMX (issue #18's AMD EPYC host), without leaving the machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from host import describe_host


def per_call_ms(rows: int, dtype: torch.dtype, calls: int) -> float:
    x = torch.randn(rows, 1536, dtype=dtype)
    w = torch.randn(8960, 1536, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(calls):
        torch.nn.functional.linear(x, w)
    return 1e3 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,2,3,5,8,16,40", help="comma-separated row counts")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(describe_host())
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "default")
    print(f"ONEDNN_MAX_CPU_ISA={isa}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')}")
    print("| rows | bf16 ms | bf16 / 1 row | float32 ms | float32 / 1 row |")
    print("|---:|---:|---:|---:|---:|")
    base = {dtype: per_call_ms(1, dtype, args.calls) for dtype in (torch.bfloat16, torch.float32)}
    for rows in (int(r) for r in args.rows.split(",")):
        bf16 = per_call_ms(rows, torch.bfloat16, args.calls)
        fp32 = per_call_ms(rows, torch.float32, args.calls)
        print(
            f"| {rows} | {bf16:.2f} | {bf16 / base[torch.bfloat16]:.1f}x | {fp32:.2f} "
            f"| {fp32 / base[torch.float32]:.1f}x |"
        )


if __name__ == "__main__":
    main()

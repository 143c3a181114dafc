"""The host line every benchmark prints first: CPU model (with family/model numbers: "AMD EPYC" alone
names several generations), cores, the vector/matrix flags that decide bf16 speed (AVX-512 bf16 and AMX
run it natively; AVX2 only emulates it, about 3x slower), torch, and whether proxyalign computes wide
bf16 matmuls in float32 here (proxyalign/precision.py)."""

from __future__ import annotations

import os
import platform

import torch

from proxyalign.precision import ENV, float32_rows

#: Environment variables that make oneDNN and ATen use a smaller instruction set than the CPU has, e.g.
#: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` to measure an AVX2-only host on an AMX one.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def describe_host() -> str:
    model, flags, generation = platform.processor() or platform.machine() or "unknown CPU", set(), {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in {"cpu family", "model"}:
                    generation.setdefault(key, value.strip())
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if generation:
        model += f" (family {generation.get('cpu family', '?')} model {generation.get('model', '?')})"
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in {"avx2", "fma"})
    limits = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if os.environ.get(name)]
    return (
        f"{model}, {os.cpu_count()} cores; flags: {' '.join(wanted) or 'n/a'}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        + (f"; instruction set limited by {' '.join(limits)}" if limits else "")
        + f"; {_wide_float32()}"
    )


def _wide_float32() -> str:
    """What proxyalign does with p's widest bf16 layer (the 1.5B's MLP) on this CPU."""
    if os.environ.get(ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"wide bf16 matmuls in float32: off ({ENV}=0)"
    rows = float32_rows(8960, 1536, torch.get_num_threads())
    return "bf16 matmuls native" if rows is None else f"bf16 emulated: matmuls of {rows}+ rows in float32"

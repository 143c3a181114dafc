"""The host line every benchmark prints first: CPU model, cores, the vector/matrix flags that decide
bf16 speed (AVX-512 bf16 and AMX run it natively; AVX2 only emulates it, about 3x slower), torch."""

from __future__ import annotations

import os
import platform

import torch

#: Environment variables that make oneDNN and ATen use a smaller instruction set than the CPU has, e.g.
#: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` to measure an AVX2-only host on an AMX one.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def describe_host() -> str:
    model, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in {"avx2", "fma"})
    limits = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if os.environ.get(name)]
    return (
        f"{model}, {os.cpu_count()} cores; flags: {' '.join(wanted) or 'n/a'}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        + (f"; instruction set limited by {' '.join(limits)}" if limits else "")
    )

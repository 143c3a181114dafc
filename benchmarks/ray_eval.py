"""The same evaluation locally and on Ray Data with 1 and 2 replicas: throughput and Ray's overhead.

    python benchmarks/ray_eval.py                         # real pair, 32 GSM8K questions (long on 2 cores)
    python benchmarks/ray_eval.py --pair tiny             # tiny random pair: a smoke run in a minute

Every run decodes the same questions with the same seed (``proxyalign.eval.evaluate``), so the records
are equal in float32 (the script checks it); in bfloat16 they are equal in distribution only, since bf16
rounding depends on the batch's shape (docs/scaling.md). Times are end to end (loading the models
included: a local run loads them in this process, a Ray run in each replica's fresh worker process),
measured one after another in one process on an otherwise idle machine; the Ray cluster is started
once, before, and its start-up is reported apart. The point is the overhead per question of going
through Ray at 1 replica: the fixed cost of starting the replicas' worker processes (measured apart,
with replicas that load no model, and subtracted) and what remains, per question. Two replicas on the
same cores say how the cores are best split (one 2-thread process or two 1-thread ones), not how Ray
scales.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from host import describe_host

from proxyalign.cluster import ReplicaResources
from proxyalign.eval import EvalConfig, evaluate
from proxyalign.eval.distributed import RayOptions
from proxyalign.testing import REAL_PAIR, save_tiny_pair

PLACEMENT = {"elapsed_s", "queued_s", "first_token_s", "tokens_per_s", "base_forwards", "aligned_forwards"}
PLACEMENT |= {"tokens_per_base_forward"}


def comparable(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        r["key"]: (r["output"], {k: v for k, v in r["stats"].items() if k not in PLACEMENT}) for r in records
    }


class Probe:
    """A replica that loads no model: what a Ray Data actor costs before the aligner loads (a worker
    process starts and imports proxyalign, torch and transformers)."""

    def __init__(self) -> None:
        import proxyalign.aligner  # noqa: F401

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch


def pipeline_start_s(replicas: int, cpus: float) -> float:
    """Seconds from building a one-row-per-block pipeline of ``replicas`` probes to its last row."""
    import ray.data
    from ray.data import ActorPoolStrategy

    start = time.perf_counter()
    items = ray.data.from_items([{"x": i} for i in range(replicas)], override_num_blocks=replicas)
    probes = items.map_batches(Probe, batch_size=1, compute=ActorPoolStrategy(size=replicas), num_cpus=cpus)
    probes.materialize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", choices=("real", "tiny"), default="real")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--method", default="confidence_bet")
    parser.add_argument("--batch-size", type=int, default=8, help="requests in flight per replica")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    args = parser.parse_args()

    import ray

    print(describe_host())
    work = Path(tempfile.mkdtemp(prefix="ray-eval-"))
    if args.pair == "tiny":
        base, aligned = save_tiny_pair(work / "pair")
        dtype = "float32"
    else:
        base, aligned = REAL_PAIR
        dtype = "bfloat16"
    cpus = os.cpu_count() or 1

    def config(name: str) -> EvalConfig:
        return EvalConfig(
            datasets=["gsm8k"],
            methods=[args.method],
            limit=args.questions,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            shots=0 if args.pair == "tiny" else None,  # the tiny pair's window is 256 tokens
            output_dir=work / name,
            progress=True,
            plot=False,
        )

    runs: list[tuple[str, float, float, Any]] = []
    start = time.perf_counter()
    local = evaluate(base, aligned, config("local"), dtype=dtype, device="cpu")
    runs.append(("local (this process)", time.perf_counter() - start, 0.0, local))

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    for replicas in [int(r) for r in args.replicas.split(",")]:
        resources = ReplicaResources(replicas=replicas, num_cpus=cpus / replicas)
        on_ray = RayOptions(resources=resources)
        fixed = pipeline_start_s(replicas, cpus / replicas)
        start = time.perf_counter()
        result = evaluate(base, aligned, config(f"ray{replicas}"), dtype=dtype, device="cpu", ray=on_ray)
        name = f"Ray, {replicas} replica(s) x {cpus / replicas:g} CPU"
        runs.append((name, time.perf_counter() - start, fixed, result))
    ray.shutdown()

    reference = comparable(local.records)
    n = len(local.records)
    tokens = sum(r["stats"]["new_tokens"] for r in local.records)
    print(
        f"\n{args.pair} pair, {n} GSM8K questions, {args.method}, batch {args.batch_size}, max "
        f"{args.max_new_tokens} new tokens ({tokens} in all); Ray start-up {ray_start:.1f} s (apart)"
    )
    print(
        "| run | wall s | questions/s | tokens/s | vs local | actor start-up s | overhead s/question "
        "(start-up apart) | overhead % (start-up apart) | records equal local |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    local_s = runs[0][1]
    for name, seconds, fixed, result in runs:
        equal = comparable(result.records) == reference
        steady = seconds - fixed - local_s
        print(
            f"| {name} | {seconds:.1f} | {n / seconds:.3f} | {tokens / seconds:.1f} "
            f"| {local_s / seconds:.3f}x | {fixed:.1f} | {steady / n:+.3f} | {100 * steady / local_s:+.1f}% "
            f"| {'yes' if equal else 'NO'} |"
        )


if __name__ == "__main__":
    main()

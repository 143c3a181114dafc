"""Ray, for the front ends that scale out (``proxyalign eval --ray``, ``proxyalign serve --ray``).

Ray is an optional dependency (``pip install 'proxyalign[ray]'``): it is imported here, lazily, and a
missing install says what to install. :class:`ReplicaResources` is what each replica asks the cluster
for, checked before anything starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from proxyalign.errors import InvalidParameterError, ProxyAlignError

__all__ = ["ReplicaResources", "connect", "match_reserved_cpus", "require_ray"]


def require_ray(feature: str) -> Any:
    """The ``ray`` module, or an error naming the extra that ``feature`` needs."""
    try:
        import ray
    except ImportError:
        raise ProxyAlignError(
            f"{feature} needs Ray, which is not installed: pip install 'proxyalign[ray]'"
        ) from None
    return ray


def connect(address: str | None, feature: str) -> bool:
    """Join the Ray cluster at ``address`` (``None``: ``$RAY_ADDRESS`` or a cluster already running on
    this machine, else a new local one). Returns whether this call started Ray (the caller then stops
    it); joining a session the process already has is a no-op."""
    ray = require_ray(feature)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address or None, include_dashboard=False, configure_logging=False)
    except ConnectionError as exc:
        raise ProxyAlignError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    return True


@dataclass(frozen=True)
class ReplicaResources:
    """How many replicas, and the CPUs and GPUs each one reserves (``None``: decided from the cluster by
    :meth:`resolve`)."""

    replicas: int = 1
    num_cpus: float | None = None
    num_gpus: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise InvalidParameterError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidParameterError(f"{name} (per replica) must be a number, got {value!r}")
            if value < 0 or (name == "num_cpus" and value == 0):
                accepted = "> 0" if name == "num_cpus" else ">= 0"
                raise InvalidParameterError(f"{name} (per replica) must be {accepted}, got {value!r}")

    def resolve(self, cluster: dict[str, float]) -> tuple[float, float]:
        """``(num_cpus, num_gpus)`` per replica: one GPU each where the cluster has GPUs; on a CPU-only
        cluster the CPUs shared evenly (so torch's threads match what Ray reserved)."""
        gpus = self.num_gpus if self.num_gpus is not None else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
        if self.num_cpus is not None:
            cpus = self.num_cpus
        elif gpus > 0:
            cpus = 1.0
        else:
            cpus = float(max(1, int(cluster.get("CPU", 1) // self.replicas)))
        return cpus, gpus


def match_reserved_cpus() -> None:
    """In a replica: torch's threads = the CPUs Ray reserved for it, not every core of the node (several
    replicas on one node would otherwise fight over the cores)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))

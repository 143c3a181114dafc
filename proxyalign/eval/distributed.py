"""Decoding an evaluation on a Ray cluster: the questions are a Ray Dataset, each replica one aligner.

:class:`RayDecoder` stands where a loaded :class:`~proxyalign.ProxyAligner` stands in
:class:`~proxyalign.eval.runner.Runner`: it has the aligner's ``names`` and ``as_completed``, so the
runner's plan, records, store and progress bar are the same code for a local and a distributed run.

Each call is one row of a Ray Dataset and one block of its own, mapped by an actor pool
(``map_batches`` with :class:`ActorPoolStrategy`): every actor loads one aligner and takes up to
``in_flight`` calls at once on as many threads, which all feed that actor's one running batch, so a
replica's batch stays full exactly as a local run's does. Records are built and written on the driver
as generations stream back, in order of completion.

Why the records equal a local run's: each call carries its own seed, and a request's tokens do not
depend on what decodes beside it, so how the calls are split between replicas changes nothing. A
replica that dies is restarted by Ray (``max_restarts=-1``) and its unfinished calls are retried
(``max_task_retries=-1``); a call's generation reaches the driver only when the call has finished, and
the record store skips keys it already holds, so no question is lost or written twice.
"""

from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxyalign.cluster import ReplicaResources, connect, match_reserved_cpus, require_ray
from proxyalign.errors import ProxyAlignError
from proxyalign.models import check_model_spec

__all__ = ["RayDecoder", "RayOptions"]


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide an evaluation runs on Ray.

    ``address``: the cluster (``None``: ``$RAY_ADDRESS``, a cluster already running on this machine, or
    a new local one). ``resources``: replicas, and CPUs/GPUs per replica (default: one GPU each on a
    cluster with GPUs, else the CPUs shared evenly)."""

    address: str | None = None
    resources: ReplicaResources = field(default_factory=ReplicaResources)


class AlignerReplica:
    """One Ray actor's aligner. Ray Data calls it on several threads at once (one call each); the
    aligner's engine batches them together."""

    def __init__(self, base: str, aligned: str, load_options: Mapping[str, Any]) -> None:
        from proxyalign.aligner import ProxyAligner

        match_reserved_cpus()
        self.aligner = ProxyAligner.from_pretrained(base, aligned, **dict(load_options))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        generations = []
        for call in batch["call"]:
            prompt, options = pickle.loads(call)
            (generation,) = self.aligner.generate([prompt], **options)  # a list: a prompt is never a batch
            generations.append(pickle.dumps(generation))
        return {"position": batch["position"], "generation": np.array(generations, dtype=object)}


class RayDecoder:
    """Decodes ``(prompt, options)`` calls on Ray replicas of ``ProxyAligner.from_pretrained(base,
    aligned, **load_options)`` (see the module docstring). Checks the model specs and connects to the
    cluster when built; ``close()`` stops a Ray instance it started."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        aligned: str | os.PathLike[str],
        options: RayOptions | None = None,
        **load_options: Any,
    ) -> None:
        self.options = options or RayOptions()
        specs = {"base": base, "aligned": aligned}
        if load_options.get("small_base") is not None:
            specs["small_base"] = load_options["small_base"]
        for role, spec in specs.items():  # the device is the replicas' business, checked there
            check_model_spec(spec, role=role, dtype=_dtype_of(load_options, role))
        self.base, self.aligned = os.fspath(base), os.fspath(aligned)
        self.load_options = {
            key: os.fspath(value) if isinstance(value, os.PathLike) else value
            for key, value in load_options.items()
        }
        self.names = {role: os.fspath(spec) for role, spec in specs.items()}
        self.started = connect(self.options.address, "proxyalign eval --ray")
        ray = require_ray("proxyalign eval --ray")
        self.num_cpus, self.num_gpus = self.options.resources.resolve(ray.cluster_resources())

    def as_completed(
        self, calls: Iterable[tuple[Any, Mapping[str, Any]]], *, in_flight: int = 8
    ) -> Iterator[tuple[int, Any]]:
        """Like :meth:`ProxyAligner.as_completed`: ``(position, Generation)`` in order of completion,
        each replica decoding ``in_flight`` calls at a time."""
        import ray.data
        from ray.data import ActorPoolStrategy, DataContext

        items = [{"position": i, "call": pickle.dumps((p, dict(o)))} for i, (p, o) in enumerate(calls)]
        if not items:
            return
        context = DataContext.get_current()
        context.enable_progress_bars = False  # the runner's bar counts questions
        # a replica's own error (a bad option, a failing criterion) crosses as itself, not as Ray Data's
        # UserCodeException, which keeps only its text (a DataContext flag of Ray Data since 2024)
        context.raise_original_map_exception = True
        dataset = ray.data.from_items(items, override_num_blocks=len(items))  # one call per block
        decoded = dataset.map_batches(
            AlignerReplica,
            fn_constructor_kwargs={
                "base": self.base,
                "aligned": self.aligned,
                "load_options": self.load_options,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(
                size=self.options.resources.replicas,
                max_tasks_in_flight_per_actor=in_flight,
                max_concurrent_calls_per_actor=in_flight,
                enable_true_multi_threading=True,
            ),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
        )
        error: BaseException | None = None
        try:
            for row in decoded.iter_rows():
                yield int(row["position"]), pickle.loads(row["generation"])
        except Exception as exc:
            error = _original(exc)
            if error is exc:
                raise
        if error is not None:
            # Raised out here, with nothing of Ray's chained to it, after a collection: Ray's error and its
            # traceback hold the failed run's executor in a reference cycle, and its actors keep their
            # CPUs until that cycle is collected (a next run in the same process waited for them, for
            # ever where the caller, a test or a REPL's last traceback kept the error).
            del decoded, dataset
            gc.collect()
            raise error

    def close(self) -> None:
        """Stop the Ray instance this decoder started (a cluster it joined keeps running)."""
        if self.started:
            require_ray("proxyalign eval --ray").shutdown()
            self.started = False


def _dtype_of(load_options: Mapping[str, Any], role: str) -> Any:
    dtype = load_options.get("dtype", "auto")
    return dtype.get(role, "auto") if isinstance(dtype, Mapping) else dtype


def _original(exc: BaseException) -> BaseException:
    """The proxyalign error a replica raised, out of Ray's wrappers (else ``exc`` itself). A
    ``RayTaskError(X)`` is also an ``X``, but its text is Ray's traceback: its ``cause`` is the error."""
    seen: BaseException | None = exc
    while seen is not None:
        cause = getattr(seen, "cause", None)
        if isinstance(seen, ProxyAlignError) and cause is None:
            return seen
        seen = cause or seen.__cause__
    return exc

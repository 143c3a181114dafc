"""Command-line pieces the ``proxyalign`` subcommands share (``generate``, ``serve``; ``eval`` parses
``--param`` and the Ray options here too): the model options, ``--param NAME=VALUE`` parsing and
``--ray`` with the replicas' resources, spelled once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from proxyalign.errors import InvalidParameterError

if TYPE_CHECKING:
    from proxyalign.cluster import ReplicaResources

__all__ = [
    "RAY_FLAGS",
    "add_model_args",
    "add_ray_args",
    "check_models",
    "load_pair",
    "parse_params",
    "prompt_formats",
    "replica_resources",
]

#: The options that mean something only with ``--ray`` (``serve`` adds ``--autoscaling``).
RAY_FLAGS = ("replicas", "num_cpus_per_replica", "num_gpus_per_replica")


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    """``["margin=0.2", ...]`` -> ``{"margin": "0.2"}``; the criterion converts and checks the values."""
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(f"--param expects NAME=VALUE, got {pair!r}")
        params[key.strip()] = value.strip()
    return params


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--base``, ``--aligned``, ``--small-base``, dtype, device, prompt formats, remote code."""
    group = parser.add_argument_group("models")
    group.add_argument("--base", required=True, help="large base model p: hub id, directory, .gguf or asset")
    group.add_argument("--aligned", required=True, help="small aligned model q*")
    group.add_argument("--small-base", help="small base model q (needed by implicit_reward)")
    group.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    group.add_argument("--base-format", default="auto", choices=("auto", "plain", "chat"))
    group.add_argument("--aligned-format", default="auto", choices=("auto", "plain", "chat"))
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")


def check_models(args: argparse.Namespace, criterion: Any) -> dict[str, str]:
    """Everything about the model options that can be checked without loading (a criterion that needs
    q without ``--small-base``, dtype, device, paths); the given models by role."""
    from proxyalign.models import check_model_spec

    if criterion.needs_small_base and not args.small_base:
        raise InvalidParameterError(
            f"criterion {criterion.name!r} needs the small base model q: pass --small-base"
        )
    specs = {"base": args.base, "aligned": args.aligned}
    if args.small_base:
        specs["small_base"] = args.small_base
    for role, spec in specs.items():
        check_model_spec(spec, role=role, dtype=args.dtype, device=args.device)
    return specs


def prompt_formats(args: argparse.Namespace) -> dict[str, str]:
    """Each model's prompt format from ``--base-format`` / ``--aligned-format`` (q follows p)."""
    return {"base": args.base_format, "aligned": args.aligned_format, "small_base": args.base_format}


def load_pair(args: argparse.Namespace, criterion: Any, **extra: Any) -> Any:
    """The :class:`~proxyalign.ProxyAligner` the model options describe (``extra``: e.g. ``scheduler``);
    the caller has checked everything it can before this minute of loading."""
    from proxyalign.aligner import ProxyAligner

    return ProxyAligner.from_pretrained(
        base=args.base,
        aligned=args.aligned,
        small_base=args.small_base,
        criterion=criterion,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        prompt_formats=prompt_formats(args),
        **extra,
    )


def add_ray_args(group: Any, *, ray_help: str, replicas_help: str, replicas_group: Any = None) -> None:
    """``--ray [ADDRESS]``, ``--replicas`` (in ``replicas_group`` if given: ``serve`` makes it exclusive
    with ``--autoscaling``) and each replica's CPUs and GPUs (defaults: :class:`ReplicaResources`)."""
    group.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=ray_help)
    replicas = replicas_group or group
    replicas.add_argument("--replicas", type=int, default=None, metavar="N", help=replicas_help)
    group.add_argument(
        "--num-cpus-per-replica",
        type=float,
        default=None,
        metavar="N",
        help="CPUs per replica (default: 1 with GPUs; on a CPU-only cluster, its CPUs shared evenly)",
    )
    group.add_argument(
        "--num-gpus-per-replica",
        type=float,
        default=None,
        metavar="N",
        help="GPUs per replica, fractions allowed (default: 1 when the cluster has GPUs, else 0)",
    )


def replica_resources(
    args: argparse.Namespace, *, replicas: int | None = None, extra_flags: Sequence[str] = ()
) -> ReplicaResources | None:
    """The replicas' resources from :func:`add_ray_args`'s options, checked; ``None`` without ``--ray``,
    where any of them (or of ``extra_flags``) is an error. ``replicas`` overrides ``--replicas``."""
    from proxyalign.cluster import ReplicaResources

    if args.ray is None:
        flags = (*RAY_FLAGS, *extra_flags)
        given = [f"--{n.replace('_', '-')}" for n in flags if getattr(args, n) is not None]
        if given:
            raise InvalidParameterError(f"{given[0]} needs --ray")
        return None
    count = replicas if replicas is not None else args.replicas
    return ReplicaResources(
        replicas=1 if count is None else count,
        num_cpus=args.num_cpus_per_replica,
        num_gpus=args.num_gpus_per_replica,
    )

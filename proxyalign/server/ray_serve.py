"""``proxyalign serve --ray``: the same OpenAI-compatible app, as Ray Serve replicas.

Each replica is its own process (perhaps on another machine) with its own :class:`ProxyAligner`, so
its own continuous-batching engine; Serve's HTTP proxy spreads requests over them and can add or remove
replicas (``autoscaling_config``). Replicas cannot be handed loaded models: they load the pair by path
from a :class:`PairSpec`, plain picklable values, and build the app with
:func:`proxyalign.server.app.create_app`, unchanged.

Ray is imported only inside the functions here, and only when ``--ray`` is given (the ``ray`` extra).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxyalign.cluster import ReplicaResources, connect, match_reserved_cpus, require_ray
from proxyalign.engine.scheduler import SchedulerConfig
from proxyalign.errors import InvalidParameterError, ProxyAlignError
from proxyalign.server.config import ServerConfig
from proxyalign.settings import DEFAULT_CRITERION

if TYPE_CHECKING:
    from proxyalign.aligner import GenerationConfig

__all__ = [
    "APP_NAME",
    "PairSpec",
    "ProxyAlignReplica",
    "Replicas",
    "build_app",
    "check_autoscaling",
    "deploy",
    "deployment",
    "import_serve",
    "resources_per_replica",
    "run_ray_serve",
    "undeploy",
]

logger = logging.getLogger("proxyalign.server")

#: How errors name what needs Ray.
FEATURE = "proxyalign serve --ray"

#: The Serve application's name on the cluster (``serve status`` shows it).
APP_NAME = "proxyalign"
#: Requests a replica may hold beyond the rows its engine admits: the cheap routes (/health,
#: /v1/models, /metrics) must not wait behind a full batch.
ROUTE_HEADROOM = 8
#: A replica whose constructor fails (a model that does not load) is retried this often, not Serve's
#: default 20: a missing file or too little memory does not heal, and each try may cost a minute.
CONSTRUCTOR_RETRIES = 3


def import_serve() -> Any:
    """``ray.serve``, or the one line that says what to install."""
    require_ray(FEATURE)
    try:
        from ray import serve
    except ImportError as exc:  # Ray without its serve extra
        raise ProxyAlignError(
            f"{FEATURE} needs Ray Serve ({exc.name} is missing): pip install 'proxyalign[ray]'"
        ) from None
    return serve


@dataclass(frozen=True)
class PairSpec:
    """What every replica loads: the arguments of :meth:`ProxyAligner.from_pretrained`, as plain values
    that pickle (the criterion by name, so a plugin's class is resolved in the replica)."""

    base: str
    aligned: str
    small_base: str | None = None
    criterion: str = DEFAULT_CRITERION
    criterion_params: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    device: str | None = None
    trust_remote_code: bool = False
    prompt_formats: Mapping[str, str] | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    generation_config: GenerationConfig | None = None  #: requests' defaults (``--mode``, ``--gamma``)
    calibrate_rows: int = 0  #: mode auto's forward costs measured up to this many rows at load

    def load(self) -> Any:
        from proxyalign.aligner import ProxyAligner

        aligner = ProxyAligner.from_pretrained(
            self.base,
            self.aligned,
            small_base=self.small_base,
            criterion=self.criterion,
            criterion_params=dict(self.criterion_params),
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            prompt_formats=dict(self.prompt_formats) if self.prompt_formats else None,
            scheduler=self.scheduler,
            generation_config=self.generation_config,
        )
        if self.calibrate_rows:
            aligner.calibrate_auto(self.calibrate_rows)
        return aligner


@dataclass(frozen=True)
class Replicas:
    """How many replicas and what each reserves: ``resources`` (as for ``proxyalign eval --ray``) gives
    the CPUs and GPUs per replica and, without ``autoscaling``, the fixed number of replicas; with
    Serve's ``autoscaling`` config, ``resources.replicas`` is the most there may be (it divides a
    CPU-only cluster's CPUs between them)."""

    resources: ReplicaResources = field(default_factory=ReplicaResources)
    autoscaling: Mapping[str, Any] | None = None

    def describe(self) -> str:
        """For the log: "2 replicas", "1 to 4 replicas (autoscaling)"."""
        if self.autoscaling is not None:
            low, high = self.autoscaling.get("min_replicas", 1), self.autoscaling.get("max_replicas", 1)
            return f"{low} to {high} replicas (autoscaling)"
        count = self.resources.replicas
        return f"{count} replica{'s' if count != 1 else ''}"


def check_autoscaling(value: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Serve's ``autoscaling_config`` as given, checked by Serve's own model (which ignores unknown
    keys, so a misspelt one is refused here)."""
    from ray.serve.config import AutoscalingConfig

    unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
    if unknown:
        known = ", ".join(sorted(AutoscalingConfig.model_fields))
        raise InvalidParameterError(
            f"--autoscaling: unknown key(s) {', '.join(unknown)}; Serve knows {known}"
        )
    try:
        AutoscalingConfig.model_validate(dict(value))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        detail = (
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in errors())
            if callable(errors)
            else str(exc)
        )
        raise InvalidParameterError(f"--autoscaling: {detail}") from None
    return dict(value)


class ProxyAlignReplica:
    """One Serve replica: loads its own aligner, then (Serve calls ``__serve_build_asgi_app__`` after
    the constructor) serves the same app as ``proxyalign serve``. Serve runs the app's lifespan, so its
    shutdown drains running requests before ``__del__`` closes the engine."""

    def __init__(self, pair: PairSpec, config: ServerConfig) -> None:
        match_reserved_cpus()
        self.config = config
        self.aligner = pair.load()

    def __serve_build_asgi_app__(self) -> Any:
        from proxyalign.server.app import create_app

        return create_app(self.aligner, self.config)

    def __del__(self) -> None:
        aligner = getattr(self, "aligner", None)
        if aligner is not None:
            aligner.close()


def deployment_options(
    pair: PairSpec, config: ServerConfig, replicas: Replicas, num_cpus: float, num_gpus: float
) -> dict[str, Any]:
    """Serve's options for the deployment. ``max_ongoing_requests`` lets a replica hold every request
    its engine would admit (each has one row or more), so the engine's own limits decide and a full
    replica answers 429 like the plain server, instead of Serve queueing silently below them."""
    options: dict[str, Any] = {
        "name": "ProxyAligner",
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": pair.scheduler.max_rows + config.max_waiting + ROUTE_HEADROOM,
        "graceful_shutdown_timeout_s": config.drain_s,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if replicas.autoscaling is not None:
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = dict(replicas.autoscaling)
    else:
        options["num_replicas"] = replicas.resources.replicas
    return options


def deployment(
    pair: PairSpec, config: ServerConfig, replicas: Replicas, num_cpus: float = 1.0, num_gpus: float = 0.0
) -> Any:
    """The Serve deployment of :class:`ProxyAlignReplica` (not yet bound to its arguments)."""
    serve = import_serve()
    ingress = serve.ingress()(ProxyAlignReplica)
    return serve.deployment(ingress, **deployment_options(pair, config, replicas, num_cpus, num_gpus))


def build_app(
    pair: PairSpec, config: ServerConfig, replicas: Replicas, num_cpus: float = 1.0, num_gpus: float = 0.0
) -> Any:
    """The bound Serve application: ``serve.run(build_app(...), route_prefix="/")`` serves it."""
    return deployment(pair, config, replicas, num_cpus, num_gpus).bind(pair, config)


def resources_per_replica(pair: PairSpec, replicas: Replicas) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` per replica, from the cluster (see ``ReplicaResources.resolve``); no
    GPU by default for a pair pinned to the CPU (or an Apple GPU), where one would idle."""
    import ray

    num_cpus, num_gpus = replicas.resources.resolve(ray.cluster_resources())
    pinned = pair.device is not None and not pair.device.startswith("cuda")
    if pinned and replicas.resources.num_gpus is None:
        num_gpus = 0.0
    return num_cpus, num_gpus


def _check_port_free(host: str, port: int) -> None:
    """Serve's proxy binds the port in another process, where a clash only shows up as a proxy that
    never starts; probing here turns it into one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InvalidParameterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def deploy(app: Any, config: ServerConfig, *, client_mode: bool = False) -> bool:
    """Start Serve's HTTP proxy on ``config.host:config.port`` (unless Serve already runs on the
    cluster: its proxy, and its host and port, stay as they are) and run ``app`` at ``/``; returns
    whether this call started Serve (for :func:`undeploy`). Blocks until every replica has loaded its
    models."""
    serve = import_serve()
    status = serve.status()
    if APP_NAME in status.applications:
        raise InvalidParameterError(
            f"a {APP_NAME!r} application already runs on this Ray cluster: stop it first "
            f"(serve.delete({APP_NAME!r})), or use another cluster"
        )
    started = not (status.proxies or status.applications)
    if started:
        if not client_mode:
            _check_port_free(config.host, config.port)
        serve.start(http_options={"host": config.host, "port": config.port})
    else:
        logger.warning(
            "Serve already runs on this cluster: its HTTP proxy keeps its own host and port (--host and "
            "--port do not apply), and only the %r application is removed on exit",
            APP_NAME,
        )
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # DEPLOY_FAILED: a replica's constructor failed every try
        undeploy(started)
        raise ProxyAlignError(f"the replicas did not start: {exc}") from None
    except BaseException:
        undeploy(started)
        raise
    return started


def warn_if_short(replicas: Replicas, num_cpus: float, num_gpus: float) -> None:
    """Serve waits, silently but for its own warnings, until the cluster can place every replica (an
    autoscaling cluster may add nodes): say so at once when it cannot now."""
    import ray

    count = replicas.resources.replicas
    if replicas.autoscaling is not None:
        count = replicas.autoscaling.get("initial_replicas") or replicas.autoscaling.get("min_replicas", 1)
    have = ray.cluster_resources()
    for resource, each in (("CPU", num_cpus), ("GPU", num_gpus)):
        if count * each > have.get(resource, 0):
            logger.warning(
                "%d replicas need %g %s but the cluster has %g: Serve waits until it can place them",
                count,
                count * each,
                resource,
                have.get(resource, 0),
            )


def undeploy(started: bool) -> None:
    """Remove what :func:`deploy` added. The application goes first, while Serve's proxy still runs:
    its replicas stop taking requests and finish the running ones (for ``graceful_shutdown_timeout_s``,
    i.e. ``--drain-seconds``), and their streams still reach the clients. Then, if this process started
    Serve, Serve itself (``serve.shutdown()`` alone would kill the proxy under the running streams)."""
    serve = import_serve()
    try:
        serve.delete(APP_NAME)
    finally:
        if started:
            serve.shutdown()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM; a second one afterwards acts as usual (Ctrl-C quits at once)."""
    stop = threading.Event()
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in wanted}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_ray_serve(address: str | None, pair: PairSpec, config: ServerConfig, replicas: Replicas) -> int:
    """Connect to Ray (``address`` as for ``proxyalign eval --ray``: None joins ``$RAY_ADDRESS`` or a
    cluster running on this machine, else starts a local one), deploy the replicas, serve until
    SIGINT/SIGTERM, then remove the deployment (its replicas drain for ``config.drain_s``) and
    disconnect. Everything was checked by the caller."""
    import_serve()
    joined = connect(address, FEATURE)
    try:
        num_cpus, num_gpus = resources_per_replica(pair, replicas)
        app = build_app(pair, config, replicas, num_cpus, num_gpus)
        where = f"{replicas.describe()}, {num_cpus:g} CPU and {num_gpus:g} GPU each"
        logger.info("deploying %s (p) and %s (q*) on Ray Serve: %s", pair.base, pair.aligned, where)
        warn_if_short(replicas, num_cpus, num_gpus)
        started = deploy(app, config, client_mode=bool(address and address.startswith("ray://")))
        try:
            key = " (API key required)" if config.api_key else ""
            url = f"http://{config.host}:{config.port}/v1"
            logger.info("serving %r at %s on Ray Serve%s; Ctrl-C stops", config.model_name, url, key)
            wait_for_signal()
            logger.info("stopping: the replicas finish their requests (up to %gs)", config.drain_s)
        finally:
            undeploy(started)
    finally:
        if joined:
            require_ray(FEATURE).shutdown()
    return 0


def pair_from_args(
    args: argparse.Namespace,
    criterion: str,
    params: Mapping[str, Any],
    scheduler: SchedulerConfig,
    generation: GenerationConfig | None = None,
    *,
    calibrate_rows: int = 0,
) -> PairSpec:
    """The :class:`PairSpec` of ``proxyalign serve``'s model options (checked by the caller)."""
    from proxyalign.cli_args import prompt_formats

    return PairSpec(
        base=args.base,
        aligned=args.aligned,
        small_base=args.small_base,
        criterion=criterion,
        criterion_params=dict(params),
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        prompt_formats=prompt_formats(args),
        scheduler=scheduler,
        generation_config=generation,
        calibrate_rows=calibrate_rows,
    )

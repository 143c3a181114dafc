"""``proxyalign eval``: the command-line front of :mod:`proxyalign.eval` (arguments and the command)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from proxyalign.cli_args import add_ray_args, parse_params, replica_resources
from proxyalign.cluster import require_ray
from proxyalign.errors import ProxyAlignError
from proxyalign.eval.config import EvalConfig, parse_datasets
from proxyalign.eval.data import DATASETS
from proxyalign.eval.distributed import RayOptions
from proxyalign.eval.harness import evaluate
from proxyalign.eval.prompts import PROMPT_STYLES
from proxyalign.eval.report import markdown_table, report_directory

__all__ = ["add_eval_arguments", "config_from_args", "ray_options_from_args", "run_eval_command"]

EPILOG = f"""\
examples:
  proxyalign eval --base qwen2.5-coder-1.5b-instruct --aligned qwen2.5-coder-0.5b-instruct \\
      --datasets gsm8k,arc_challenge --limit 100 \\
      --methods base,aligned,nudging,dual_kad,confidence_bet[margin=0.2]
  proxyalign eval ... --methods base,aligned,confidence_bet --sweep margin=0,0.1,0.2 --dev 30
  proxyalign eval ... --datasets svamp=data/svamp.jsonl,math500=hub
  proxyalign eval ... --ray --replicas 4           # on Ray replicas (docs/scaling.md); same records
  proxyalign eval --report-only eval-results      # rebuild report.md / sweep.png from the records

datasets: {", ".join(DATASETS)} (or NAME=PATH.jsonl, NAME=hub, PATH.jsonl)
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``proxyalign eval``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    models = parser.add_argument_group("models")
    models.add_argument("--base", help="large base model p: hub id, directory, .gguf or offline asset name")
    models.add_argument("--aligned", help="small aligned model q*")
    models.add_argument("--small-base", help="small base model q (needed by implicit_reward)")
    models.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    models.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    models.add_argument("--trust-remote-code", action="store_true")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--datasets", default="gsm8k", help="comma-separated: gsm8k, math500, arc_challenge, csqa, svamp=FILE"
    )
    data.add_argument("--limit", type=int, default=50, help="test questions per dataset (default 50; 0: all)")
    data.add_argument("--shots", type=int, help="worked examples in few-shot prompts (default: all standard)")
    data.add_argument("--base-prompt", default="fewshot", choices=PROMPT_STYLES, help="p's prompt style")
    data.add_argument("--aligned-prompt", default="chat-cot", choices=PROMPT_STYLES, help="q*'s prompt style")

    methods = parser.add_argument_group("methods")
    methods.add_argument(
        "--methods",
        action="append",
        help="comma-separated criteria with optional parameters in brackets, e.g. "
        "base,aligned,dual_kad[threshold=0.3],confidence_bet[margin=0.2] (default: base,aligned,CRITERION)",
    )
    methods.add_argument("--criterion", help="one more hybrid method (with --param); default confidence_bet")
    methods.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="--criterion's parameter"
    )
    methods.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="[CRITERION.]PARAM=V1,V2",
        help="try several values; margin/lambda map onto a one-parameter criterion's own parameter",
    )
    methods.add_argument(
        "--dev", type=int, default=0, help="with --sweep: tune on N dev questions, report test"
    )

    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--seed", default="0", help="seed, or comma-separated seeds (default 0)")
    decoding.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="requests in flight: as one question finishes, the next joins the running batch (default 8)",
    )
    decoding.add_argument("--max-new-tokens", type=int, default=512)
    decoding.add_argument("--temperature", type=float, default=0.7)
    decoding.add_argument("--top-k", type=int)
    decoding.add_argument("--top-p", type=float)
    decoding.add_argument("--criterion-on", default="scaled", choices=("scaled", "raw"))
    decoding.add_argument(
        "--mode",
        default="token",
        help="token (default), speculative or auto (the faster of the two on this host; same distribution)",
    )
    decoding.add_argument("--gamma", default="4", help="speculative mode: drafts per round, or 'adaptive'")

    scale = parser.add_argument_group("scaling out on Ray (pip install 'proxyalign[ray]'; docs/scaling.md)")
    add_ray_args(
        scale,
        ray_help="decode on Ray replicas: the cluster at ADDRESS, else $RAY_ADDRESS, a cluster already "
        "running here, or a new local one. Records equal a local run's",
        replicas_help="with --ray: replicas, each with the models (default 1)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--output", default="eval-results", help="directory of records.jsonl and reports")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--no-plot", action="store_true", help="skip sweep.png")
    out.add_argument("--report-only", metavar="DIR", help="rebuild the reports of DIR from its records")


def _methods(args: argparse.Namespace) -> list[str]:
    methods = [m for m in (args.methods or [])]
    if args.criterion or not methods:
        name = args.criterion or "confidence_bet"
        params = [f"{key}={value}" for key, value in parse_params(args.param).items()]
        hybrid = f"{name}[{','.join(params)}]" if params else name
        methods = methods or ["base", "aligned"]
        methods.append(hybrid)
    elif args.param:
        raise ProxyAlignError(
            "--param sets a parameter of --criterion; with --methods write NAME[param=value]"
        )
    return methods


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An :class:`~proxyalign.eval.EvalConfig` from parsed ``proxyalign eval`` arguments."""
    try:
        seeds = [int(s) for s in str(args.seed).split(",") if s.strip()]
    except ValueError:
        raise ProxyAlignError(
            f"--seed expects an integer or comma-separated integers, got {args.seed!r}"
        ) from None
    return EvalConfig(
        datasets=parse_datasets(args.datasets),
        methods=_methods(args),
        limit=args.limit or None,
        seeds=seeds,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        criterion_on=args.criterion_on,
        mode=args.mode,
        gamma=int(args.gamma) if str(args.gamma).isdigit() else args.gamma,
        prompts={"base": args.base_prompt, "aligned": args.aligned_prompt},
        shots=args.shots,
        sweeps=list(args.sweep),
        dev=args.dev,
        output_dir=args.output,
        progress=not args.no_progress,
        plot=not args.no_plot,
    )


def ray_options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """The Ray settings of ``proxyalign eval``, checked (``None``: decode in this process)."""
    resources = replica_resources(args)
    if resources is None:
        return None
    require_ray("proxyalign eval --ray")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the progress bar says what it would
    return RayOptions(address=args.ray or None, resources=resources)


def run_eval_command(args: argparse.Namespace, console: Any) -> int:
    """Run ``proxyalign eval``; print the report; return the exit status."""
    if args.report_only:
        result = report_directory(args.report_only)
    else:
        if not args.base or not args.aligned:
            raise ProxyAlignError("proxyalign eval needs --base and --aligned (or --report-only DIR)")
        config = config_from_args(args)
        ray = ray_options_from_args(args)
        result = evaluate(
            args.base,
            args.aligned,
            config,
            ray=ray,
            small_base=args.small_base,
            dtype=args.dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    console.print(markdown_table(result.summaries), markup=False, soft_wrap=True)
    for info in result.tuned.values():
        console.print(
            f"tuned on {info['dev_size']} dev questions of {info['dataset']}: {info['criterion']} "
            f"{info['param']}={info['value']:g}",
            markup=False,
        )
    console.print(f"records: {result.output_dir / 'records.jsonl'}", markup=False)
    console.print(f"report:  {result.report_path}", markup=False)
    if result.plot_path is not None:
        console.print(f"plot:    {result.plot_path}", markup=False)
    return 0

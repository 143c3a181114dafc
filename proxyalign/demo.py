"""The README's main job: the real offline pair decodes GSM8K questions together.

p (Qwen2.5-Coder-1.5B-Instruct) gets a plain few-shot prompt, the way a *base* model is prompted in
the papers; q* (Qwen2.5-Coder-0.5B-Instruct) gets its chat template. The same questions run with p
alone, q* alone and the hybrid, so a newcomer sees what the hybrid changed and what it cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from proxyalign.aligner import ProxyAligner
from proxyalign.display import highlight, stats_line
from proxyalign.engine.results import Generation
from proxyalign.eval.data import Problem, load_gsm8k
from proxyalign.eval.extract import score
from proxyalign.eval.prompts import build_prompt, stop_strings
from proxyalign.progress import DecodeProgress
from proxyalign.settings import DEFAULT_CRITERION

__all__ = ["DemoConfig", "run_demo"]

PAIR = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
#: p gets the benchmark's plain few-shot prompt, q* zero-shot chain of thought in its chat template.
STYLES = {"base": "fewshot", "aligned": "chat-cot"}


@dataclass(frozen=True)
class DemoConfig:
    questions: int = 3
    shots: int = 3
    max_new_tokens: int = 256
    criterion: str = DEFAULT_CRITERION
    criterion_params: tuple[tuple[str, Any], ...] = ()
    temperature: float = 0.7
    seed: int = 0
    dtype: str = "bfloat16"


def _prompt(problem: Problem) -> dict[str, Any]:
    return {role: build_prompt(problem, style) for role, style in STYLES.items()}


def _methods(config: DemoConfig) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("p alone", "base", {}),
        ("q* alone", "aligned", {}),
        (f"hybrid: {config.criterion}", config.criterion, dict(config.criterion_params)),
    ]


def run_demo(
    config: DemoConfig = DemoConfig(), console: Console | None = None
) -> dict[str, list[Generation]]:
    """Decode ``config.questions`` GSM8K questions with p, q* and the hybrid; print a comparison."""
    console = console or Console(highlight=False)
    console.rule("[bold]proxyalign demo[/]: a 1.5B model borrows a 0.5B model's alignment at decoding time")
    problems = load_gsm8k(limit=config.questions, shots=config.shots, progress=False)
    started = time.perf_counter()
    aligner = ProxyAligner.from_pretrained(
        *PAIR,
        criterion=config.criterion,
        criterion_params=dict(config.criterion_params),
        dtype=config.dtype,
        device="cpu",
        prompt_formats={"base": "plain", "aligned": "chat"},
    )
    console.print(
        f"loaded p = {PAIR[0]}, q* = {PAIR[1]} ({config.dtype}) in {time.perf_counter() - started:.1f}s; "
        f"{len(problems)} GSM8K questions, {config.shots}-shot plain prompt for p, zero-shot chain of "
        "thought in its chat template for q*, "
        f"temperature {config.temperature}, seed {config.seed}, up to {config.max_new_tokens} new tokens"
    )
    prompts = [_prompt(problem) for problem in problems]
    results: dict[str, list[Generation]] = {}
    timings: dict[str, float] = {}
    # The hybrid continues p's plain prompt, so p's stop strings (next question, new turn) apply to it.
    stop = list(stop_strings(problems[0], STYLES["base"]))
    for label, criterion, params in _methods(config):
        console.print(f"[dim]decoding the batch with {label} ...[/]")
        tick = time.perf_counter()
        with DecodeProgress(aligner, len(prompts), label):
            results[label] = aligner.generate(
                prompts,
                criterion=criterion,
                criterion_params=params,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=config.seed,
                stop=stop if criterion != "aligned" else [],
            )
        timings[label] = time.perf_counter() - tick
    for index, problem in enumerate(problems):
        _print_problem(console, aligner, index, problem, results)
    _print_summary(console, problems, results, timings)
    return results


def _print_problem(console: Console, aligner: ProxyAligner, index: int, problem: Problem, results) -> None:
    console.rule(f"question {index + 1}")
    console.print(problem.question)
    console.print(f"[bold]gold answer:[/] {problem.answer}")
    for label, generations in results.items():
        generation = generations[index]
        predicted, correct = score(generation.text, problem.answer, problem.kind)
        verdict = "[green]correct[/]" if correct else "[red]wrong[/]"
        title = f"{label} -> {predicted} ({verdict})"
        body = (
            highlight(generation, aligner.tokenizer) if label.startswith("hybrid") else Text(generation.text)
        )
        console.print(Panel(body, title=title, title_align="left"))
        console.print(stats_line(generation), style="cyan")
    console.print(
        "[black on yellow] highlighted [/] tokens were produced by q* after the criterion rejected p's"
    )


def _print_summary(console: Console, problems: list[Problem], results, timings: dict[str, float]) -> None:
    table = Table(title="summary (same questions, prompts, seed)")
    for column in ("method", "correct", "new tokens", "tokens/s", "rejection rate", "from q*"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for label, generations in results.items():
        correct = sum(score(g.text, p.answer, p.kind)[1] for g, p in zip(generations, problems, strict=True))
        tokens = sum(g.stats.new_tokens for g in generations)
        drafts = sum(g.stats.drafts for g in generations)
        rejected = sum(g.stats.rejected_drafts for g in generations)
        from_aligned = sum(g.stats.tokens_from_aligned for g in generations)
        rate = f"{rejected / drafts:.1%}" if drafts else "n/a"
        table.add_row(
            label,
            f"{correct}/{len(problems)}",
            str(tokens),
            f"{tokens / timings[label]:.1f}",
            rate,
            f"{from_aligned / max(tokens, 1):.0%}",
        )
    console.print(table)
    console.print(
        "[dim]Both models are instruction-tuned (no base checkpoint of this family ships offline): "
        "p is prompted like a base model. Three questions say nothing about accuracy.[/]"
    )

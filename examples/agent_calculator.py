"""A LangChain agent (``create_agent``) with a calculator answers GSM8K questions through the hybrid.

The hybrid decides when to call ``calculator`` (the tool is offered through the models' chat template
and the calls are parsed from what they write), LangChain runs it, and the hybrid answers from its
results. ``--eval`` runs the same questions with p alone, q* alone and the hybrid, all concurrently
through one engine (each agent in a thread of its own, so the engine's batch stays full), and reports
accuracy, the share of well-formed tool calls and tool calls per question.

Small models, given a tool's result, often call it again (or write the call out until ``max_tokens``
cuts it) instead of answering. A middleware (``answer_instead_of_repeating``) then asks again with
``tool_choice="none"`` and a prose-only ``response_format``, both enforced by the engine; the evaluation
counts these forced answers, and a call cut short as a malformed attempt.

    proxyalign models fetch qwen2.5-coder-pair                      # once (make fetch)
    python examples/agent_calculator.py --questions 3               # the hybrid, each step printed
    python examples/agent_calculator.py --questions 3 --criterion nudging
    python examples/agent_calculator.py --eval --questions 30 --summary agent_eval.json
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool
from langchain_proxyalign import ChatProxyAlign
from langgraph.errors import GraphRecursionError

from proxyalign import ProxyAligner
from proxyalign.eval.data import Problem, load_gsm8k
from proxyalign.eval.extract import score
from proxyalign.settings import DEFAULT_CRITERION
from proxyalign.testing import REAL_PAIR

#: Short on purpose: these small models answer in prose when asked for an answer format up front, and
#: call the tool when told only to use it (measured on the real pair; the GSM8K extractor reads prose).
SYSTEM = "You are a careful assistant. Use the calculator tool for arithmetic."
#: ``--eval``: p alone, q* alone, and the hybrid.
EVAL_METHODS = ("base", "aligned", DEFAULT_CRITERION)

# -- the tool: arithmetic only, no eval() ---------------------------------------------------------------
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses)."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    return value(ast.parse(expression.replace("^", "**").replace(",", ""), mode="eval").body)


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses, e.g. '(12 + 4) * 3'."""
    try:
        result = evaluate(expression)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
        return f"Error: {exc}"
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


# -- the agent ------------------------------------------------------------------------------------------
#: Text that shows a reply tried to call a tool: a tag, or a call object the parser did not accept
#: (an unknown tool name, text around it); such a reply with no parsed call counts as a malformed attempt.
_ATTEMPT = re.compile(r'<tool_call>|"arguments"\s*:|"name"\s*:\s*"calculator"')


def malformed_attempts(reply: AIMessage) -> int:
    """Tool-call blocks that did not parse, or one unparsed attempt in a reply without any call."""
    if reply.invalid_tool_calls:
        return len(reply.invalid_tool_calls)
    return int(not reply.tool_calls and _ATTEMPT.search(reply.text) is not None)


def _call_key(call: dict[str, Any]) -> str:
    return json.dumps([call["name"], call["args"]], sort_keys=True)


#: Text without braces, tags or code fences: an answer in prose, not another call written out.
PROSE = {"type": "regex", "pattern": r"[^{}<>`]+"}
#: Where a replaced reply's fault is noted (``response_metadata`` of the answer that replaced it).
REPLACED = "replaced_reply"


def _fault(request: ModelRequest, reply: AIMessage) -> str | None:
    """Why a reply that follows tool results is no answer: it repeats a call, or writes a broken one."""
    if not any(isinstance(m, ToolMessage) for m in request.messages):
        return None
    made = {_call_key(c) for m in request.messages if isinstance(m, AIMessage) for c in m.tool_calls}
    if reply.tool_calls:
        return "repeated_call" if all(_call_key(c) in made for c in reply.tool_calls) else None
    return "malformed_call" if malformed_attempts(reply) else None


@wrap_model_call
def answer_instead_of_repeating(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    """Small models often repeat a call whose result they already have, or write it out again until
    ``max_tokens`` cuts it; then they must answer. Asked again with ``tool_choice="none"`` and a
    prose-only ``response_format`` (both enforced by the engine), the model reads the calls and their
    results and writes the answer; the answer notes what it replaced (for the evaluation's counts).
    """
    response = handler(request)
    reply = next((m for m in reversed(response.result) if isinstance(m, AIMessage)), None)
    fault = _fault(request, reply) if reply is not None else None
    if fault is None:
        return response
    settings = {**request.model_settings, "response_format": PROSE}
    retried = handler(request.override(tool_choice="none", model_settings=settings))
    for message in retried.result:
        if isinstance(message, AIMessage):
            message.response_metadata[REPLACED] = fault
    return retried


def build_agent(aligner: ProxyAligner, criterion: str, max_tokens: int, seed: int = 0) -> Any:
    """A ``create_agent`` agent whose model is the hybrid (or p or q* alone) under ``criterion``."""
    chat = ChatProxyAlign(
        aligner=aligner, criterion=criterion, max_tokens=max_tokens, temperature=0, seed=seed
    )
    return create_agent(
        chat, tools=[calculator], system_prompt=SYSTEM, middleware=[answer_instead_of_repeating]
    )


# -- one question -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One agent run: its answer, whether it is right, and how it used the tool."""

    question: str
    method: str
    gold: str
    answer: str
    extracted: str | None
    correct: bool
    tool_calls: int  # calls parsed from the model's output (well formed)
    malformed_calls: int  # attempts that did not parse (see malformed_attempts)
    forced_answers: int  # replies the middleware replaced by a prose answer (answer_instead_of_repeating)
    seconds: float
    error: str | None = None


def outcome(problem: Problem, method: str, messages: Sequence[BaseMessage], seconds: float) -> Outcome:
    replies = [m for m in messages if isinstance(m, AIMessage)]
    faults = [m.response_metadata[REPLACED] for m in replies if REPLACED in m.response_metadata]
    answer = replies[-1].text if replies else ""
    extracted, correct = score(answer, problem.answer, problem.kind)
    return Outcome(
        question=problem.id,
        method=method,
        gold=problem.answer,
        answer=answer,
        extracted=extracted,
        correct=correct,
        tool_calls=sum(len(m.tool_calls) for m in replies),
        malformed_calls=sum(malformed_attempts(m) for m in replies) + faults.count("malformed_call"),
        forced_answers=len(faults),
        seconds=seconds,
    )


def solve(agent: Any, problem: Problem, method: str, max_steps: int) -> tuple[Outcome, list[BaseMessage]]:
    """Run the agent on one question; a run that hits ``max_steps`` graph steps counts as unanswered."""
    started = time.perf_counter()
    state = {"messages": [{"role": "user", "content": problem.question}]}
    try:
        messages = agent.invoke(state, config={"recursion_limit": max_steps})["messages"]
    except GraphRecursionError:
        result = outcome(problem, method, [], time.perf_counter() - started)
        result.error = f"no answer within {max_steps} steps"
        return result, []
    return outcome(problem, method, messages, time.perf_counter() - started), messages


def print_run(result: Outcome, messages: Sequence[BaseMessage] = ()) -> None:
    """One run's answer and tool use (its calls and results when ``messages`` are given), at once."""
    mark = "right" if result.correct else "wrong"
    print(
        f"[{result.method}] {result.question}: {result.extracted} (gold {result.gold}, {mark}); "
        f"{result.tool_calls} tool calls, {result.malformed_calls} malformed, {result.seconds:.1f}s",
        flush=True,
    )
    for message in messages:
        if isinstance(message, AIMessage) and message.tool_calls:
            print("  call:", ", ".join(f"{c['name']}({c['args']})" for c in message.tool_calls))
        elif isinstance(message, ToolMessage):
            print("  result:", message.text)
    if result.error:
        print("  error:", result.error)
    else:
        print("  answer:", " ".join(result.answer.split())[:300])


# -- many questions, several methods ------------------------------------------------------------------------
def summarize(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """Per method: accuracy, the share of tool-call attempts that parsed, tool calls per question."""
    summary: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(o.method for o in outcomes):
        rows = [o for o in outcomes if o.method == method]
        calls, malformed = sum(o.tool_calls for o in rows), sum(o.malformed_calls for o in rows)
        summary[method] = {
            "questions": len(rows),
            "accuracy": sum(o.correct for o in rows) / len(rows),
            "well_formed_call_share": calls / (calls + malformed) if calls + malformed else None,
            "tool_calls_per_question": calls / len(rows),
            "malformed_calls": malformed,
            "forced_answers": sum(o.forced_answers for o in rows),
            "unanswered": sum(o.error is not None for o in rows),
            "mean_seconds": sum(o.seconds for o in rows) / len(rows),
        }
    return summary


def run_eval(aligner: ProxyAligner, problems: Sequence[Problem], args: argparse.Namespace) -> list[Outcome]:
    """Every (method, question) agent in a thread of its own: their model calls share the engine's batch."""
    agents = {method: build_agent(aligner, method, args.max_tokens, args.seed) for method in EVAL_METHODS}
    jobs = [(method, problem) for method in EVAL_METHODS for problem in problems]
    with ThreadPoolExecutor(max_workers=min(args.workers, len(jobs))) as pool:
        futures = [pool.submit(solve, agents[m], p, m, args.max_steps) for m, p in jobs]
        outcomes = []
        for future in futures:
            outcomes.append(future.result()[0])
            print_run(outcomes[-1])
    return outcomes


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    columns = ("accuracy", "well-formed calls", "calls/question", "forced answers", "unanswered")
    print("\n" + f"{'method':<16}" + "".join(f"{c:>19}" for c in columns))
    for method, row in summary.items():
        share = row["well_formed_call_share"]
        values = (
            f"{row['accuracy']:.1%}",
            "n/a" if share is None else f"{share:.1%}",
            f"{row['tool_calls_per_question']:.2f}",
            row["forced_answers"],
            row["unanswered"],
        )
        print(f"{method:<16}" + "".join(f"{v:>19}" for v in values))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=3, help="GSM8K test questions (the first N)")
    parser.add_argument("--criterion", default=DEFAULT_CRITERION, help="criterion of a single run")
    parser.add_argument("--eval", action="store_true", help=f"compare {', '.join(EVAL_METHODS)}")
    parser.add_argument("--max-tokens", type=int, default=384, help="new tokens per model call")
    parser.add_argument("--max-steps", type=int, default=12, help="agent graph steps per question")
    parser.add_argument("--workers", type=int, default=32, help="--eval: agents running at once")
    parser.add_argument("--summary", default="agent_calculator_summary.json", help="--eval: JSON output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: the loader's choice")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    problems = load_gsm8k(limit=args.questions, shots=0, progress=False)
    aligner = ProxyAligner.from_pretrained(*REAL_PAIR, dtype=args.dtype, device=args.device)
    if not args.eval:
        agent = build_agent(aligner, args.criterion, args.max_tokens, args.seed)
        for problem in problems:
            print(f"\n{problem.question}")
            print_run(*solve(agent, problem, args.criterion, args.max_steps))
        return
    started = time.perf_counter()
    outcomes = run_eval(aligner, problems, args)
    summary = summarize(outcomes)
    print_summary(summary)
    report = {
        "questions": len(problems),
        "methods": list(EVAL_METHODS),
        "max_tokens": args.max_tokens,
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "outcomes": [asdict(o) for o in outcomes],
    }
    with open(args.summary, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nwrote {args.summary}")


if __name__ == "__main__":
    main()

"""A LlamaIndex FunctionAgent with a calculator, thinking through the real offline pair.

The hybrid decides when to call ``multiply`` or ``add`` (the tools are offered through the models' chat
template, and the calls are parsed from what they write), LlamaIndex runs the tools, and the hybrid
answers from their results. Each step prints the calls and results as they happen, then the answer.

The pair's small coder models tend to repeat their last call after its result instead of answering, so
each question gets two LLM steps (the call, then usually its repetition, which is not run) and then,
with ``early_stopping_method="generate"``, LlamaIndex asks for the final answer without tools. Raise
``STEPS`` for problems that need several calls.

    proxyalign models fetch qwen2.5-coder-pair     # once (make fetch)
    python examples/llamaindex_function_agent.py   # or: ... "your own word problem"
"""

from __future__ import annotations

import asyncio
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCall, ToolCallResult
from llama_index.llms.proxyalign import ProxyAlign

from proxyalign.testing import REAL_PAIR

QUESTIONS = (
    "A box holds 12 eggs. How many eggs are there in 7 boxes?",
    "Sam has 35 marbles and wins 28 more at school. How many marbles does he have now?",
)
SYSTEM = (
    "You are a calculator assistant. Call a tool for each arithmetic step. When the tool results give "
    "the answer, reply with the answer in one sentence; never repeat a call."
)
STEPS = 2  # LLM steps before the final answer is asked for


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


async def solve(agent: FunctionAgent, question: str) -> str:
    """Run the agent on one question, printing each tool call and its result as they happen."""
    print(f"Q: {question}")
    handler = agent.run(question, max_iterations=STEPS)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"   {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
        elif isinstance(event, ToolCall):
            print(f"   calling {event.tool_name} ...")
    output: AgentOutput = await handler
    print(f"A: {output.response.content}\n")
    return str(output.response.content)


async def main(questions: tuple[str, ...]) -> None:
    base, aligned = REAL_PAIR
    llm = ProxyAlign(
        base=base,
        aligned=aligned,
        load_kwargs={"dtype": "bfloat16"},
        criterion="confidence_bet",
        max_new_tokens=64,
        temperature=0,
    )
    agent = FunctionAgent(
        tools=[multiply, add], llm=llm, system_prompt=SYSTEM, early_stopping_method="generate"
    )
    for question in questions:
        await solve(agent, question)


if __name__ == "__main__":
    asyncio.run(main((" ".join(sys.argv[1:]),) if sys.argv[1:] else QUESTIONS))

"""The real offline pair (Qwen2.5-Coder 1.5B base role + 0.5B instruct) behind a BM25 RAG query engine
and a FunctionAgent with a calculator."""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_index.core import SimpleDirectoryReader
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.retrievers.bm25 import BM25Retriever
from proxyalign import ProxyAligner

from llama_index.llms.proxyalign import ProxyAlign

pytestmark = pytest.mark.real_weights


def test_rag_query_engine_on_the_real_pair(real_aligner: ProxyAligner, repo_docs: list[Path]) -> None:
    llm = ProxyAlign(aligner=real_aligner, max_new_tokens=4, temperature=0)
    assert llm.metadata.model_name == "qwen2.5-coder-1.5b-instruct+qwen2.5-coder-0.5b-instruct"
    assert llm.metadata.is_chat_model and llm.metadata.context_window >= 4096
    documents = SimpleDirectoryReader(input_files=[str(f) for f in repo_docs]).load_data()
    chunks = SentenceSplitter(chunk_size=96, chunk_overlap=0).get_nodes_from_documents(documents)
    retriever = BM25Retriever.from_defaults(nodes=chunks, similarity_top_k=1)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm)
    response = engine.query("What does a rejection criterion decide?")
    assert str(response).strip()
    assert len(response.source_nodes) == 1

    completion = llm.complete("def add(a, b):\n    return", max_new_tokens=3)
    assert completion.text.strip()
    assert set(completion.raw["token_sources"]) <= {"base", "aligned"}
    assert completion.raw["usage"]["completion_tokens"] <= 3


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


async def test_function_agent_calls_the_calculator_and_answers(real_aligner: ProxyAligner) -> None:
    """The hybrid chooses the tool itself (tool_choice "auto"). These small models repeat a call after
    its result rather than answer, so the second step is the last and LlamaIndex then asks for the
    answer without tools (early_stopping_method="generate")."""
    llm = ProxyAlign(aligner=real_aligner, max_new_tokens=32, temperature=0)
    system = (
        "You are a calculator assistant. Call a tool for each arithmetic step. When the tool results give "
        "the answer, reply with the answer in one sentence; never repeat a call."
    )
    agent = FunctionAgent(
        tools=[multiply, add], llm=llm, system_prompt=system, early_stopping_method="generate"
    )
    handler = agent.run("A box holds 12 eggs. How many eggs are there in 7 boxes?", max_iterations=2)
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    answer = await handler
    calls = [(r.tool_name, sorted(r.tool_kwargs.values())) for r in results]
    assert calls == [("multiply", [7, 12])], (calls, answer.response.content)
    assert results[0].tool_output.raw_output == 84
    assert "84" in str(answer.response.content)

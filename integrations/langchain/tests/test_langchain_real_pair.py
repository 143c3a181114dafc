"""Smoke tests on the real offline pair (Qwen2.5-Coder 1.5B base role + 0.5B instruct), a few tokens each."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_tests.integration_tests import ChatModelIntegrationTests
from proxyalign import ProxyAligner
from pydantic import BaseModel

from langchain_proxyalign import ChatProxyAlign, ProxyAlignLLM

pytestmark = pytest.mark.real_weights


def test_chat_model_on_the_real_pair(real_aligner: ProxyAligner) -> None:
    chat = ChatProxyAlign(aligner=real_aligner, max_tokens=4, temperature=0)
    messages = [SystemMessage("Answer with one word."), HumanMessage("What color is the sky on a clear day?")]
    reply = chat.invoke(messages)
    assert reply.content.strip()
    meta = reply.response_metadata
    assert meta["model_name"] == "qwen2.5-coder-1.5b-instruct+qwen2.5-coder-0.5b-instruct"
    assert set(meta["token_sources"]) <= {"base", "aligned"}
    assert len(meta["token_sources"]) == reply.usage_metadata["output_tokens"] <= 4
    # The aligned model's chat template: the prompt is far longer than the raw text.
    assert reply.usage_metadata["input_tokens"] == chat.get_num_tokens_from_messages(messages) > 20
    streamed = "".join(c.content for c in chat.stream(messages))
    assert streamed == reply.content
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | chat | StrOutputParser()
    answers = chain.batch([{"q": "Say hi."}, {"q": "Name a prime number."}])
    assert all(a.strip() for a in answers)


def test_text_llm_on_the_real_pair(real_aligner: ProxyAligner) -> None:
    llm = ProxyAlignLLM(aligner=real_aligner, max_tokens=4, temperature=0, criterion="nudging")
    result = llm.generate(["def add(a, b):\n    return"])
    (generation,) = result.generations[0]
    assert generation.text.strip()
    assert generation.generation_info["criterion"] == "nudging"
    assert result.llm_output["token_usage"]["completion_tokens"] <= 4
    assert llm.get_num_tokens("def add(a, b):") == len(real_aligner.tokenizer.encode("def add(a, b):"))


EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "agent_calculator.py"


def agent_example() -> ModuleType:
    """examples/agent_calculator.py, imported: the test runs the example's own agent."""
    spec = importlib.util.spec_from_file_location("agent_calculator", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = sys.modules["agent_calculator"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_create_agent_calls_the_calculator_and_uses_its_result(real_aligner: ProxyAligner) -> None:
    pytest.importorskip(
        "langchain.agents", reason="needs langchain: pip install -e 'integrations/langchain[agents]'"
    )
    example = agent_example()
    agent = example.build_agent(real_aligner, "confidence_bet", max_tokens=60)
    question = "A crate holds 23 rows of 47 apples. How many apples are in the crate?"
    state = agent.invoke({"messages": [HumanMessage(question)]}, config={"recursion_limit": 8})
    messages = state["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    results = [m.text for m in messages if isinstance(m, ToolMessage)]
    assert calls and calls[0]["name"] == "calculator", messages
    assert "1081" in results, messages
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert "1081" in final.text.replace(",", ""), final.text


class Capital(BaseModel):
    """A country's capital city."""

    country: str
    capital: str


def test_schema_constrained_structured_output(real_aligner: ProxyAligner) -> None:
    chat = ChatProxyAlign(aligner=real_aligner, max_tokens=40, temperature=0)
    out = chat.with_structured_output(Capital, include_raw=True).invoke("What is the capital of France?")
    assert out["parsing_error"] is None, out["raw"].content
    assert isinstance(out["parsed"], Capital)
    assert out["parsed"].capital == "Paris"
    assert Capital.model_validate_json(out["raw"].content) == out["parsed"]


class _RealPairAnswers(ChatModelIntegrationTests):
    """LangChain's standard integration tests that check what the model *answers* (the tiny random
    models can only give well-formed but arbitrary calls and JSON there), run on the real pair."""

    def __init__(self, aligner: ProxyAligner) -> None:
        self._aligner = aligner

    @property
    def chat_model_class(self) -> type[ChatProxyAlign]:
        return ChatProxyAlign

    @property
    def chat_model_params(self) -> dict:
        return {"aligner": self._aligner, "temperature": 0, "max_tokens": 96}

    has_tool_calling = True
    has_tool_choice = True
    has_structured_output = True
    supports_json_mode = True


@pytest.mark.parametrize(
    "name", ["test_tool_calling", "test_unicode_tool_call_integration", "test_json_mode"]
)
def test_standard_answer_checks_on_the_real_pair(real_aligner: ProxyAligner, name: str) -> None:
    suite = _RealPairAnswers(real_aligner)
    getattr(suite, name)(suite.chat_model_class(**suite.chat_model_params))

"""Smoke tests on the real offline pair (Qwen2.5-Coder 1.5B base role + 0.5B instruct), a few tokens each."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from proxyalign import ProxyAligner

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

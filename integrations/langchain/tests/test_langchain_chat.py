"""ChatProxyAlign beyond the standard suites: batching, concurrency, streaming, metadata, limits."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, FunctionMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from proxyalign import ProxyAligner
from proxyalign.prompts import tokenize_prompt
from proxyalign.testing import tiny_aligner

from langchain_proxyalign import ChatProxyAlign
from langchain_proxyalign.chat_models import to_engine_messages

PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14"]


def make(aligner: ProxyAligner, **kwargs: Any) -> ChatProxyAlign:
    return ChatProxyAlign(aligner=aligner, **{"max_tokens": 8, "temperature": 0, **kwargs})


def engine_texts(aligner: ProxyAligner, prompts: list[str], **kwargs: Any) -> list[str]:
    chats = [[{"role": "user", "content": p}] for p in prompts]
    options = {"max_new_tokens": 8, "temperature": 0, **kwargs}
    return [g.text for g in aligner.generate(chats, **options)]


class TokenCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.lock = threading.Lock()

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        with self.lock:
            self.tokens.append(token)


def test_messages_use_the_aligned_chat_template(tiny: ProxyAligner, count_calls: Any) -> None:
    calls = count_calls(tiny, "generate")
    messages = [SystemMessage("w4"), HumanMessage("w5 w6"), AIMessage("w7"), HumanMessage("w8")]
    reply = make(tiny).invoke(messages)
    expected = [
        {"role": "system", "content": "w4"},
        {"role": "user", "content": "w5 w6"},
        {"role": "assistant", "content": "w7"},
        {"role": "user", "content": "w8"},
    ]
    assert calls == [[expected]]
    assert reply.content == tiny.generate([expected], max_new_tokens=8, temperature=0)[0].text


def steps(aligner: ProxyAligner) -> int:
    return aligner.status()["totals"].get("steps", 0)


@pytest.mark.parametrize("method", ["batch", "generate"])
def test_batch_prompts_decode_side_by_side(tiny: ProxyAligner, method: str) -> None:
    """LangChain runs a chat batch as one call per prompt; they share the engine's running batch."""
    alone = tiny.generate(
        [[{"role": "user", "content": p}] for p in PROMPTS], max_new_tokens=8, temperature=0
    )
    expected = [g.text for g in alone]
    chat = make(tiny)
    start = steps(tiny)
    if method == "batch":
        texts = [m.content for m in chat.batch(PROMPTS)]
    else:
        result = chat.generate([[HumanMessage(p)] for p in PROMPTS])
        texts = [g[0].text for g in result.generations]
        assert result.llm_output["token_usage"]["completion_tokens"] > 0
    assert texts == expected
    assert steps(tiny) - start < sum(g.stats.new_tokens for g in alone), "calls ran one after another"


async def test_abatch_prompts_decode_side_by_side(tiny: ProxyAligner) -> None:
    alone = tiny.generate(
        [[{"role": "user", "content": p}] for p in PROMPTS], max_new_tokens=8, temperature=0, stop=["w9"]
    )
    start = steps(tiny)
    replies = await make(tiny).abatch(PROMPTS, stop=["w9"])
    assert [m.content for m in replies] == [g.text for g in alone]
    assert steps(tiny) - start < sum(g.stats.new_tokens for g in alone)


def test_batch_keeps_per_prompt_callbacks_and_bound_settings(tiny: ProxyAligner) -> None:
    collectors = [TokenCollector() for _ in PROMPTS]
    configs = [{"callbacks": [c], "tags": [str(i)]} for i, c in enumerate(collectors)]
    replies = make(tiny).bind(criterion="aligned").batch(PROMPTS, config=configs)
    for reply in replies:
        assert set(reply.response_metadata["token_sources"]) == {"aligned"}
        assert reply.response_metadata["criterion"] == "aligned"


def test_streaming_callbacks_get_each_prompts_tokens(tiny: ProxyAligner) -> None:
    """A streaming handler gets tokens as they come; prompts of a batch stream side by side."""
    collectors = [TokenCollector(), TokenCollector()]
    configs = [{"callbacks": [c]} for c in collectors]
    replies = make(tiny, streaming=True).batch(PROMPTS[:2], config=configs)
    assert ["".join(c.tokens) for c in collectors] == [r.content for r in replies]


def test_a_failing_prompt_fails_alone(tiny: ProxyAligner) -> None:
    too_long = " ".join(["w5"] * 300)  # longer than the tiny models' 256-token window
    replies = make(tiny).batch([PROMPTS[0], too_long], return_exceptions=True)
    assert isinstance(replies[0], AIMessage) and replies[0].content
    assert isinstance(replies[1], ValueError) and "context window" in str(replies[1])


async def test_sixteen_concurrent_ainvoke_match_single_calls(tiny: ProxyAligner) -> None:
    chat = make(tiny)
    prompts = [f"w{4 + i} w{20 + i}" for i in range(16)]
    alone = [chat.invoke(p).content for p in prompts]
    together = await asyncio.gather(*(chat.ainvoke(p) for p in prompts))
    assert [m.content for m in together] == alone


def test_concurrent_threads_are_safe(tiny: ProxyAligner) -> None:
    chat = make(tiny)
    alone = [chat.invoke(p).content for p in PROMPTS]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = chat.invoke(PROMPTS[i]).content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == alone


async def test_ainvoke_does_not_block_the_event_loop(tiny: ProxyAligner) -> None:
    chat = make(tiny, max_tokens=150)
    ticks = 0
    task = asyncio.ensure_future(chat.ainvoke(PROMPTS[0]))
    while not task.done():
        ticks += 1
        await asyncio.sleep(0.001)
    assert (await task).content and ticks > 3


async def test_astream_does_not_block_the_event_loop(tiny: ProxyAligner) -> None:
    chat = make(tiny, max_tokens=150)
    ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.ensure_future(tick())
    chunks = [c async for c in chat.astream(PROMPTS[0])]
    done.set()
    await ticker
    assert len(chunks) > 2 and ticks > 3


def test_stream_callbacks_and_provenance(tiny: ProxyAligner) -> None:
    chat = make(tiny, max_tokens=12)
    collector = TokenCollector()
    chunks = list(chat.stream(PROMPTS[0], config={"callbacks": [collector]}))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == chat.invoke(PROMPTS[0]).content
    assert "".join(collector.tokens) == full.content
    assert [c.content for c in chunks if c.content] == [t for t in collector.tokens if t]
    assert chunks[-1].chunk_position == "last"
    meta = full.response_metadata
    assert len(meta["token_sources"]) == len(meta["token_ids"]) == full.usage_metadata["output_tokens"]
    assert meta["model_name"] == "tiny-base+tiny-aligned" and meta["finish_reason"] in {"eos", "length"}
    assert full.usage_metadata["input_tokens"] == meta["proxyalign_stats"]["prompt_tokens"]


def test_invoke_with_streaming_true_streams_to_callbacks(tiny: ProxyAligner) -> None:
    collector = TokenCollector()
    reply = make(tiny, streaming=True).invoke(PROMPTS[0], config={"callbacks": [collector]})
    assert "".join(collector.tokens) == reply.content == make(tiny).invoke(PROMPTS[0]).content


async def test_astream_with_early_exit_releases_the_engine(tiny: ProxyAligner) -> None:
    chat = make(tiny, max_tokens=100)
    stream = chat.astream(PROMPTS[0])
    async for _ in stream:
        break
    await stream.aclose()
    assert (await chat.ainvoke(PROMPTS[1])).content  # the engine's lock was released


@pytest.mark.parametrize("streaming", [False, True])
def test_multi_token_stop_strings(tiny: ProxyAligner, streaming: bool) -> None:
    chat = make(tiny, max_tokens=12)
    full = chat.invoke(PROMPTS[0]).content
    words = full.split(" ")
    assert len(words) >= 4, full
    stop = f"{words[1]} {words[2]}"
    expected = full[: full.index(stop)]
    if streaming:
        text = "".join(c.content for c in chat.stream(PROMPTS[0], stop=[stop]))
    else:
        reply = chat.invoke(PROMPTS[0], stop=[stop])
        text = reply.content
        assert reply.response_metadata["stop_sequence"] == stop
    assert text == expected
    assert make(tiny, max_tokens=12, stop=[stop]).invoke(PROMPTS[0]).content == expected


def test_usage_metadata_and_response_metadata(tiny: ProxyAligner) -> None:
    reply = make(tiny, max_tokens=5).invoke(PROMPTS[0])
    prompt = tokenize_prompt([{"role": "user", "content": PROMPTS[0]}], "auto", tiny.tokenizer)
    assert reply.usage_metadata["input_tokens"] == len(prompt)
    assert 0 < reply.usage_metadata["output_tokens"] <= 5
    meta = reply.response_metadata
    assert meta["token_usage"]["total_tokens"] == reply.usage_metadata["total_tokens"]
    assert meta["criterion"] == "dual_kad" and "rejection_rate" in meta["proxyalign_stats"]


def test_token_counting(tiny: ProxyAligner) -> None:
    chat = make(tiny)
    assert chat.get_num_tokens("w5 w6 w7") == 3
    messages = [HumanMessage("w5 w6 w7")]
    expected = tokenize_prompt(to_engine_messages(messages), "auto", tiny.tokenizer)
    assert chat.get_num_tokens_from_messages(messages) == len(expected) > 3


def test_per_call_criterion_and_params(tiny: ProxyAligner) -> None:
    chat = make(tiny, criterion="nudging", criterion_params={"threshold": 0.3})
    meta = chat.invoke(PROMPTS[0]).response_metadata
    assert (meta["criterion"], meta["criterion_params"]) == ("nudging", {"threshold": 0.3})
    meta = chat.invoke(PROMPTS[0], criterion_params={"threshold": 0.5}).response_metadata
    assert (meta["criterion"], meta["criterion_params"]) == ("nudging", {"threshold": 0.5})
    meta = chat.bind(criterion="confidence_bet").invoke(PROMPTS[0]).response_metadata
    assert (meta["criterion"], meta["criterion_params"]) == ("confidence_bet", {"margin": 0.2})
    assert (
        chat.bind(criterion="base").invoke(PROMPTS[0]).content
        == engine_texts(tiny, PROMPTS[:1], criterion="base")[0]
    )


def test_cache_key_tells_settings_apart(tiny: ProxyAligner, count_calls: Any) -> None:
    calls = count_calls(tiny, "generate")
    set_llm_cache(InMemoryCache())
    try:
        chat = make(tiny, temperature=1.0, seed=7)
        first = chat.invoke(PROMPTS[0])
        assert chat.invoke(PROMPTS[0]).content == first.content and len(calls) == 1  # cache hit
        chat.invoke(PROMPTS[0], criterion="base")  # another criterion: another entry
        make(tiny, temperature=1.0, seed=8).invoke(PROMPTS[0])  # another seed: another entry
        make(tiny, temperature=0.5, seed=7).invoke(PROMPTS[0])  # another temperature: another entry
        assert len(calls) == 4
    finally:
        set_llm_cache(None)


def test_identifying_params(tiny: ProxyAligner) -> None:
    params = make(tiny, seed=1, top_k=5, criterion="confidence_bet")._identifying_params
    assert {k: params[k] for k in ("base", "aligned", "criterion", "criterion_params", "seed", "top_k")} == {
        "base": "tiny-base",
        "aligned": "tiny-aligned",
        "criterion": "confidence_bet",
        "criterion_params": {"margin": 0.2},
        "seed": 1,
        "top_k": 5,
    }
    ls = make(tiny)._get_ls_params(stop=["x"])
    assert ls["ls_provider"] == "proxyalign" and ls["ls_model_name"] == "tiny-base+tiny-aligned"
    assert (ls["ls_temperature"], ls["ls_max_tokens"], ls["ls_stop"]) == (0, 8, ["x"])


def test_lcel_chain(tiny: ProxyAligner) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "w4"), ("human", "{question}")])
    chain = prompt | make(tiny) | StrOutputParser()
    answer = chain.invoke({"question": "w5 w6"})
    expected = tiny.generate(
        [[{"role": "system", "content": "w4"}, {"role": "user", "content": "w5 w6"}]],
        max_new_tokens=8,
        temperature=0,
    )[0].text
    assert answer == expected
    assert chain.batch([{"question": "w5 w6"}, {"question": "w7"}])[0] == expected


def test_unsupported_inputs_raise(tiny: ProxyAligner) -> None:
    chat = make(tiny)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(NotImplementedError, match="text only"):
        chat.invoke([HumanMessage(content=[{"type": "text", "text": "w5"}, image])])
    with pytest.raises(NotImplementedError, match="ToolMessage"):
        chat.invoke([HumanMessage("w5"), FunctionMessage("w6", name="f")])
    with pytest.raises(ValueError, match="cannot switch models"):
        chat.invoke("w5", model="other")


def test_plain_text_base_model_gets_a_transcript(count_calls: Any) -> None:
    """The papers' setting: the base model reads plain text, the aligned model its chat template."""
    aligner = tiny_aligner(prompt_formats={"base": "plain", "aligned": "chat"})
    calls = count_calls(aligner, "generate")
    messages = [SystemMessage("w4"), HumanMessage("w5 w6")]
    chat = make(aligner)
    reply = chat.invoke(messages)
    chats = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w5 w6"}]
    expected_prompt = {"base": "System: w4\nUser: w5 w6\nAssistant:", "aligned": chats}
    assert calls == [[expected_prompt]]
    assert reply.content == aligner.generate([expected_prompt], max_new_tokens=8, temperature=0)[0].text
    custom = make(aligner, messages_to_prompt=lambda ms: " ".join(m.content for m in ms))
    custom.invoke(messages)
    assert calls[-1] == [{"base": "w4 w5 w6", "aligned": chats}]
    assert chat.get_num_tokens_from_messages(messages) == len(
        tokenize_prompt(chats, "chat", aligner.tokenizer)
    )

"""ProxyAlign (LlamaIndex CustomLLM) on tiny random models: every path goes through the real engine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from proxyalign import GenerationConfig, ProxyAligner
from proxyalign.prompts import tokenize_prompt
from proxyalign.testing import tiny_aligner, tiny_model, tiny_tokenizer

from llama_index.llms.proxyalign import ProxyAlign

PROMPT = "w5 w6 w7"
CHAT = [
    ChatMessage(role=MessageRole.SYSTEM, content="w4"),
    ChatMessage(role=MessageRole.USER, content="w5 w6"),
]
ENGINE_CHAT = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w5 w6"}]


def make(aligner: ProxyAligner, **kwargs: Any) -> ProxyAlign:
    return ProxyAlign(aligner=aligner, **{"max_new_tokens": 8, "temperature": 0, **kwargs})


def engine_text(aligner: ProxyAligner, prompt: Any, **kwargs: Any) -> str:
    return aligner.generate([prompt], **{"max_new_tokens": 8, "temperature": 0, **kwargs})[0].text


def test_is_a_function_calling_llm_with_correct_metadata(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    assert isinstance(llm, FunctionCallingLLM)
    meta = llm.metadata
    assert meta.context_window == 256  # both tiny models are built for 256 positions
    assert meta.num_output == 8
    assert meta.model_name == "tiny-base+tiny-aligned"
    assert meta.is_chat_model and meta.is_function_calling_model
    assert make(tiny, context_window=100).metadata.context_window == 100
    assert ProxyAlign(aligner=tiny).metadata.num_output == tiny.defaults.max_new_tokens


def test_context_window_is_the_smaller_models() -> None:
    base, aligned = tiny_model(0), tiny_model(1)
    aligned.config.max_position_embeddings = 128
    llm = ProxyAlign(aligner=ProxyAligner(base, aligned, tiny_tokenizer()))
    assert llm.metadata.context_window == 128


def test_complete(tiny: ProxyAligner) -> None:
    response = make(tiny).complete(PROMPT)
    assert response.text == engine_text(tiny, PROMPT)
    raw = response.raw
    assert raw["usage"] == response.additional_kwargs
    assert raw["usage"]["prompt_tokens"] == 3 and 0 < raw["usage"]["completion_tokens"] <= 8
    assert len(raw["token_sources"]) == len(raw["token_ids"]) == raw["usage"]["completion_tokens"]
    assert raw["criterion"] == "dual_kad" and 0 <= raw["proxyalign_stats"]["rejection_rate"] <= 1


def test_stream_complete_yields_deltas(tiny: ProxyAligner) -> None:
    responses = list(make(tiny).stream_complete(PROMPT))
    assert len(responses) > 1
    assert "".join(r.delta for r in responses) == responses[-1].text == engine_text(tiny, PROMPT)
    assert all(r.delta for r in responses[:-1])
    final = responses[-1]
    assert final.raw["usage"]["completion_tokens"] == sum(len(r.raw["delta_token_ids"]) for r in responses)
    assert final.raw["token_sources"] == [s for r in responses for s in r.raw["delta_token_sources"]]
    assert final.additional_kwargs == final.raw["usage"]


def test_chat_uses_the_aligned_chat_template(tiny: ProxyAligner, count_calls: Any) -> None:
    calls = count_calls(tiny, "generate")
    response = make(tiny).chat(CHAT)
    assert calls == [[ENGINE_CHAT]]
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == engine_text(tiny, ENGINE_CHAT)
    prompt_tokens = len(tokenize_prompt(ENGINE_CHAT, "auto", tiny.tokenizer))
    assert response.raw["usage"]["prompt_tokens"] == prompt_tokens


def test_stream_chat(tiny: ProxyAligner) -> None:
    responses = list(make(tiny).stream_chat(CHAT))
    assert "".join(r.delta for r in responses) == responses[-1].message.content
    assert responses[-1].message.content == engine_text(tiny, ENGINE_CHAT)
    assert responses[-1].raw["finish_reason"] in {"eos", "length"}


async def test_async_variants(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    assert (await llm.acomplete(PROMPT)).text == engine_text(tiny, PROMPT)
    deltas = [r.delta async for r in await llm.astream_complete(PROMPT)]
    assert "".join(deltas) == engine_text(tiny, PROMPT)
    assert (await llm.achat(CHAT)).message.content == engine_text(tiny, ENGINE_CHAT)
    responses = [r async for r in await llm.astream_chat(CHAT)]
    assert (
        responses[-1].message.content == "".join(r.delta for r in responses) == engine_text(tiny, ENGINE_CHAT)
    )


async def test_sixteen_concurrent_acomplete_match_single_calls(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    prompts = [f"w{4 + i} w{20 + i}" for i in range(16)]
    alone = [llm.complete(p).text for p in prompts]
    together = await asyncio.gather(*(llm.acomplete(p) for p in prompts))
    assert [r.text for r in together] == alone


async def test_async_does_not_block_the_event_loop(tiny: ProxyAligner) -> None:
    llm = make(tiny, max_new_tokens=150)
    ticks = 0
    task = asyncio.ensure_future(llm.acomplete(PROMPT))
    while not task.done():
        ticks += 1
        await asyncio.sleep(0.001)
    assert (await task).text and ticks > 3
    ticks = 0
    stream = await llm.astream_chat(CHAT)
    ticker_done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not ticker_done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.ensure_future(tick())
    assert [r async for r in stream]
    ticker_done.set()
    await ticker
    assert ticks > 3


@pytest.mark.parametrize("method", ["complete", "stream_complete"])
def test_multi_token_stop_strings(tiny: ProxyAligner, method: str) -> None:
    llm = make(tiny, max_new_tokens=12)
    full = llm.complete(PROMPT).text
    words = full.split(" ")
    assert len(words) >= 4, full
    stop = f"{words[1]} {words[2]}"
    expected = full[: full.index(stop)]
    if method == "complete":
        response = llm.complete(PROMPT, stop=[stop])
        assert response.raw["stop_sequence"] == stop and response.raw["finish_reason"] == "stop"
        assert response.text == expected
    else:
        assert "".join(r.delta for r in llm.stream_complete(PROMPT, stop=[stop])) == expected
    assert make(tiny, max_new_tokens=12, stop=[stop]).complete(PROMPT).text == expected


def test_per_call_settings_and_copies_share_the_models(tiny: ProxyAligner) -> None:
    llm = make(tiny, criterion="nudging", criterion_params={"threshold": 0.3})
    raw = llm.complete(PROMPT).raw
    assert (raw["criterion"], raw["criterion_params"]) == ("nudging", {"threshold": 0.3})
    raw = llm.complete(PROMPT, criterion_params={"threshold": 0.6}).raw
    assert (raw["criterion"], raw["criterion_params"]) == ("nudging", {"threshold": 0.6})
    raw = llm.complete(PROMPT, criterion="aligned").raw
    assert set(raw["token_sources"]) == {"aligned"}
    base_only = llm.model_copy(update={"criterion": "base", "criterion_params": None})
    assert base_only.aligner is tiny
    assert base_only.complete(PROMPT).text == engine_text(tiny, PROMPT, criterion="base")
    assert llm.complete(PROMPT, max_tokens=3).raw["usage"]["completion_tokens"] <= 3


def test_engine_options_are_forwarded(tiny: ProxyAligner) -> None:
    llm = make(tiny, criterion="confidence_bet", engine_kwargs={"mode": "speculative"})
    assert isinstance(llm.complete(PROMPT, gamma=2).text, str)
    with pytest.raises(ValueError, match="engine_kwargs"):
        make(tiny, engine_kwargs={"nope": 1})


def test_token_counting_handler_reads_our_usage(tiny: ProxyAligner) -> None:
    counter = TokenCountingHandler(tokenizer=make(tiny).get_token_ids)
    llm = make(tiny, callback_manager=CallbackManager([counter]))
    response = llm.chat(CHAT)
    assert counter.prompt_llm_token_count == response.raw["usage"]["prompt_tokens"]
    assert counter.completion_llm_token_count == response.raw["usage"]["completion_tokens"]
    assert llm.get_token_ids("w5 w6 w7") == [5, 6, 7]


def test_predict_goes_through_chat(tiny: ProxyAligner, count_calls: Any) -> None:
    calls = count_calls(tiny, "generate")
    answer = make(tiny).predict(PromptTemplate("w5 {x}"), x="w9")
    assert calls == [[[{"role": "user", "content": "w5 w9"}]]]
    assert answer == engine_text(tiny, [{"role": "user", "content": "w5 w9"}])


def test_plain_text_models_get_messages_to_prompt_text(count_calls: Any) -> None:
    """The papers' setting: a plain-text base model and a chat-template aligned model, one chat."""
    aligner = tiny_aligner(
        prompt_formats={"base": "plain"}, generation_config=GenerationConfig(temperature=0)
    )
    calls = count_calls(aligner, "generate")
    flatten = " ".join  # a deliberately simple messages_to_prompt
    llm = ProxyAlign(
        aligner=aligner, max_new_tokens=4, messages_to_prompt=lambda m: flatten(x.content for x in m)
    )
    assert llm.metadata.is_chat_model
    reply = llm.chat(CHAT).message.content
    assert calls[0] == [{"base": "w4 w5 w6", "aligned": ENGINE_CHAT}]
    assert reply == engine_text(aligner, {"base": "w4 w5 w6", "aligned": ENGINE_CHAT}, max_new_tokens=4)
    # Both models plain: the whole chat becomes text.
    plain = tiny_aligner(prompt_formats={"base": "plain", "aligned": "plain"})
    llm = ProxyAlign(
        aligner=plain, max_new_tokens=4, messages_to_prompt=lambda m: flatten(x.content for x in m)
    )
    assert not llm.metadata.is_chat_model
    calls = count_calls(plain, "generate")
    llm.chat(CHAT)
    assert calls == [["w4 w5 w6"]]


def test_built_from_paths_loads_each_pair_once(tmp_path: Any) -> None:
    for name, seed, layers in (("base", 0, 2), ("aligned", 1, 1)):
        tiny_model(seed, layers=layers).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    spec = {
        "base": str(tmp_path / "base"),
        "aligned": str(tmp_path / "aligned"),
        "load_kwargs": {"device": "cpu"},
    }
    first = ProxyAlign(**spec, criterion="nudging", max_new_tokens=4)
    second = ProxyAlign(**spec, criterion="base", max_new_tokens=4)
    assert first.aligner is second.aligner
    assert set(second.complete(PROMPT).raw["token_sources"]) == {"base"}


def test_unsupported_inputs_and_bad_arguments_fail_clearly(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    with pytest.raises(NotImplementedError, match="text only"):
        llm.chat(
            [
                ChatMessage(
                    role=MessageRole.USER, blocks=[TextBlock(text="w5"), ImageBlock(url="http://x/y.png")]
                )
            ]
        )
    with pytest.raises(TypeError, match="unknown argument 'temprature'"):
        llm.complete(PROMPT, temprature=0.1)
    with pytest.raises(ValueError, match="aligner"):
        ProxyAlign()
    with pytest.raises(ValueError):
        ProxyAlign(aligner=tiny, temprature=0.1)
    with pytest.raises(Exception, match="no_such_criterion"):
        ProxyAlign(aligner=tiny, criterion="no_such_criterion")

"""ProxyAlignLLM on tiny random models: every path goes through the real engine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from proxyalign import InvalidParameterError, ProxyAligner
from proxyalign.testing import tiny_model, tiny_tokenizer

from langchain_proxyalign import ProxyAlignLLM

PROMPT = "w5 w6 w7"
PROMPTS = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]


class TokenCollector(BaseCallbackHandler):
    """A real callback handler: what a UI printing tokens as they arrive would see."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.chunks: list[Any] = []
        self.ends = 0

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.tokens.append(token)
        self.chunks.append(chunk)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends += 1


class AsyncTokenCollector(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def make(aligner: ProxyAligner, **kwargs: Any) -> ProxyAlignLLM:
    return ProxyAlignLLM(aligner=aligner, **{"max_tokens": 8, "temperature": 0, **kwargs})


def test_invoke_matches_engine(tiny: ProxyAligner) -> None:
    text = make(tiny).invoke(PROMPT)
    assert isinstance(text, str) and text
    assert text == tiny.generate(PROMPT, max_new_tokens=8, temperature=0)[0].text


def test_stream_yields_the_same_text(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    chunks = list(llm.stream(PROMPT))
    assert len(chunks) > 1
    assert "".join(chunks) == llm.invoke(PROMPT)


def test_batch_is_one_engine_call(tiny: ProxyAligner, count_calls: Any) -> None:
    expected = [g.text for g in tiny.generate(PROMPTS, max_new_tokens=8, temperature=0)]
    calls = count_calls(tiny, "generate")
    assert make(tiny).batch(PROMPTS) == expected
    assert calls == [PROMPTS]


def test_generate_reports_usage_and_provenance(tiny: ProxyAligner, count_calls: Any) -> None:
    calls = count_calls(tiny, "generate")
    result = make(tiny, max_tokens=5).generate(PROMPTS)
    assert len(calls) == 1
    usage = result.llm_output["token_usage"]
    prompt_tokens = sum(len(tiny.tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert usage["prompt_tokens"] == prompt_tokens
    assert 0 < usage["completion_tokens"] <= 5 * len(PROMPTS)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result.llm_output["model_name"] == "tiny-base+tiny-aligned"
    for (generation,) in result.generations:
        info = generation.generation_info
        assert (
            len(info["token_ids"]) == len(info["token_sources"]) == info["token_usage"]["completion_tokens"]
        )
        assert set(info["token_sources"]) <= {"base", "aligned"}
        stats = info["proxyalign_stats"]
        assert stats["tokens_from_base"] + stats["tokens_from_aligned"] == len(info["token_ids"])
        assert 0 <= stats["rejection_rate"] <= 1
        assert info["criterion"] == "dual_kad" and info["criterion_params"] == {"threshold": 0.4}


async def test_ainvoke_astream_abatch(tiny: ProxyAligner, count_calls: Any) -> None:
    llm = make(tiny)
    text = llm.invoke(PROMPT)
    assert await llm.ainvoke(PROMPT) == text
    assert "".join([c async for c in llm.astream(PROMPT)]) == text
    expected = llm.batch(PROMPTS)
    calls = count_calls(tiny, "agenerate")
    assert await llm.abatch(PROMPTS) == expected
    assert calls == [PROMPTS]


def test_multi_token_stop_strings(tiny: ProxyAligner) -> None:
    llm = make(tiny, max_tokens=12)
    full = llm.invoke(PROMPT)
    words = full.split(" ")
    assert len(words) >= 4, full
    stop = f"{words[1]} {words[2]}"  # spans two tokens
    expected = full[: full.index(stop)]
    assert llm.invoke(PROMPT, stop=[stop]) == expected
    assert "".join(llm.stream(PROMPT, stop=[stop])) == expected
    assert make(tiny, max_tokens=12, stop=[stop]).invoke(PROMPT) == expected
    info = llm.generate([PROMPT], stop=[stop]).generations[0][0].generation_info
    assert info["finish_reason"] == "stop" and info["stop_sequence"] == stop


def test_callbacks_receive_every_token(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    collector = TokenCollector()
    chunks = list(llm.stream(PROMPT, config={"callbacks": [collector]}))
    assert collector.tokens == [c for c in chunks if c]
    assert collector.ends == 1
    # invoke() streams to the callbacks too when streaming=True
    streaming = make(tiny, streaming=True)
    collector = TokenCollector()
    text = streaming.invoke(PROMPT, config={"callbacks": [collector]})
    assert "".join(collector.tokens) == text == llm.invoke(PROMPT)
    sources = [s for chunk in collector.chunks for s in chunk.generation_info["token_sources"]]
    assert len(sources) == len(tiny.generate(PROMPT, max_new_tokens=8, temperature=0)[0].sources)


async def test_async_callbacks(tiny: ProxyAligner) -> None:
    llm = make(tiny, streaming=True)
    collector = AsyncTokenCollector()
    text = await llm.ainvoke(PROMPT, config={"callbacks": [collector]})
    assert "".join(collector.tokens) == text
    collector = AsyncTokenCollector()
    chunks = [c async for c in make(tiny).astream(PROMPT, config={"callbacks": [collector]})]
    assert collector.tokens == [c for c in chunks if c]


def test_streaming_batch_is_still_one_engine_call(tiny: ProxyAligner, count_calls: Any) -> None:
    calls = count_calls(tiny, "stream_batch")
    collector = TokenCollector()
    texts = make(tiny, streaming=True).batch(PROMPTS, config={"callbacks": [collector]})
    assert len(calls) == 1
    assert texts == make(tiny).batch(PROMPTS)
    assert {c.generation_info["prompt_index"] for c in collector.chunks} == {0, 1, 2}


def test_per_call_and_bound_settings_reuse_the_models(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    result = llm.generate([PROMPT], criterion="aligned").generations[0][0].generation_info
    assert set(result["token_sources"]) == {"aligned"}
    bound = llm.bind(criterion="base")
    assert (
        bound.invoke(PROMPT)
        == tiny.generate(PROMPT, criterion="base", max_new_tokens=8, temperature=0)[0].text
    )
    info = llm.generate([PROMPT], criterion_params={"threshold": 0.9}).generations[0][0].generation_info
    assert (info["criterion"], info["criterion_params"]) == ("dual_kad", {"threshold": 0.9})
    assert llm.aligner is tiny and bound.bound.aligner is tiny  # nothing was reloaded


def test_engine_options_are_forwarded(tiny: ProxyAligner) -> None:
    """Engine options without a field of their own (decoding mode, ...) pass through, per call too."""
    llm = make(tiny, criterion="confidence_bet")
    text = llm.invoke(PROMPT, mode="speculative", gamma=2)
    assert isinstance(text, str)
    assert make(tiny, engine_kwargs={"mode": "speculative"})._identifying_params["mode"] == "speculative"
    with pytest.raises(ValueError, match="engine_kwargs"):
        make(tiny, engine_kwargs={"not_an_option": 1})


def test_sss_mode_reports_the_criterion_it_samples() -> None:
    """An SSS call names no criterion: it samples implicit_reward's target, and the metadata says so."""
    from proxyalign.testing import tiny_aligner

    llm = make(tiny_aligner(small_base=True), temperature=0.7, seed=0)
    info = llm.generate([PROMPT], mode="sss").generations[0][0].generation_info
    assert info["criterion"] == "implicit_reward"


def test_bad_arguments_fail_clearly(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    with pytest.raises(TypeError, match="unknown argument 'temprature'"):
        llm.invoke(PROMPT, temprature=0.5)
    with pytest.raises(ValueError, match="cannot switch models"):
        llm.invoke(PROMPT, model="gpt-4")
    with pytest.raises(NotImplementedError, match="legacy 'functions'"):
        llm.invoke(PROMPT, functions=[{"name": "x"}])
    with pytest.raises(InvalidParameterError, match=r"tools\[0\]"):
        llm.invoke(PROMPT, tools=[{"name": "x"}])  # tools go to the engine, which checks them
    with pytest.raises(ValueError, match="aligner"):
        ProxyAlignLLM()
    with pytest.raises(ValueError):
        ProxyAlignLLM(aligner=tiny, temprature=0.5)  # misspelt field: not silently ignored
    with pytest.raises(Exception, match="no_such_criterion"):
        ProxyAlignLLM(aligner=tiny, criterion="no_such_criterion")


def test_token_counting_uses_our_tokenizer(tiny: ProxyAligner) -> None:
    llm = make(tiny)
    assert llm.get_token_ids("w5 w6 w7") == [5, 6, 7]
    assert llm.get_num_tokens("w5 w6 w7 w8") == 4


def test_identifying_params_are_a_cache_key(tiny: ProxyAligner) -> None:
    params = make(tiny, seed=3, top_p=0.9)._identifying_params
    assert params["base"] == "tiny-base" and params["aligned"] == "tiny-aligned"
    assert (params["criterion"], params["criterion_params"]) == ("dual_kad", {"threshold": 0.4})
    assert (params["temperature"], params["top_p"], params["seed"], params["max_new_tokens"]) == (
        0,
        0.9,
        3,
        8,
    )
    other = make(tiny, seed=3, top_p=0.9, criterion="nudging")._identifying_params
    assert other != params and other["criterion_params"] == {"threshold": 0.4}


def test_built_from_paths_loads_each_pair_once(tmp_path: Any) -> None:
    """Two adapters from the same model paths share one ProxyAligner (weights loaded once)."""
    for name, seed, layers in (("base", 0, 2), ("aligned", 1, 1)):
        tiny_model(seed, layers=layers).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    spec = {"base": str(tmp_path / "base"), "aligned": str(tmp_path / "aligned")}
    first = ProxyAlignLLM(**spec, criterion="nudging", max_tokens=4, load_kwargs={"device": "cpu"})
    second = ProxyAlignLLM(**spec, criterion="base", max_tokens=4, load_kwargs={"device": "cpu"})
    assert first.aligner is second.aligner
    assert set(second.generate([PROMPT]).generations[0][0].generation_info["token_sources"]) == {"base"}
    assert first.generate([PROMPT]).generations[0][0].generation_info["criterion"] == "nudging"


def test_async_does_not_block_the_event_loop(tiny: ProxyAligner) -> None:
    llm = make(tiny, max_tokens=150)

    async def main() -> int:
        ticks = 0
        task = asyncio.ensure_future(llm.ainvoke(PROMPT))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.001)
        await task
        return ticks

    assert asyncio.run(main()) > 3

"""``ProxyAlignLLM``: the hybrid decoder as a LangChain text-completion ``LLM`` (text in, text out)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LLM
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk as LCGenerationChunk
from langchain_core.outputs import LLMResult
from proxyalign import Generation, GenerationChunk
from proxyalign.adapters import EngineCall, acoalesce, coalesce, completion_info, provenance, summary, usage
from pydantic import ConfigDict

from langchain_proxyalign._settings import ProxyAlignSettings

__all__ = ["ProxyAlignLLM"]


class ProxyAlignLLM(ProxyAlignSettings, LLM):
    """A large base model decoding with a small aligned model's alignment, as a LangChain ``LLM``.

    Prompts are plain text; each model sees them in its own prompt format (set on the aligner).
    ``generate`` over several prompts submits them together; concurrent calls (``batch``, threads,
    tasks) share the engine's running batch.

    >>> from proxyalign.testing import tiny_aligner
    >>> llm = ProxyAlignLLM(aligner=tiny_aligner(), max_tokens=4, temperature=0)
    >>> isinstance(llm.invoke("w5 w6 w7"), str)
    True
    """

    # Unknown constructor arguments are errors: a misspelt setting must not silently do nothing.
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())
    _ls_model_type: ClassVar[Literal["chat", "llm"]] = "llm"

    @property
    def _llm_type(self) -> str:
        return "proxyalign"

    # -- results -----------------------------------------------------------------------------------
    def _result(self, generations: list[Generation], call: EngineCall) -> LLMResult:
        rows = []
        for generation in generations:
            info = {
                **completion_info(generation, self.model_name, call.criterion),
                "token_usage": usage([generation]),
            }
            rows.append([LCGeneration(text=generation.text, generation_info=info)])
        return LLMResult(
            generations=rows, llm_output={"token_usage": usage(generations), "model_name": self.model_name}
        )

    def _chunk(self, chunk: GenerationChunk, call: EngineCall, batch_size: int = 1) -> LCGenerationChunk:
        info: dict[str, Any] = provenance(chunk.token_ids, chunk.sources)
        if batch_size > 1:  # tokens of several prompts share the batch's run manager: say whose they are
            info["prompt_index"] = chunk.index
        if chunk.generation is not None:
            info.update(summary(chunk.generation, self.model_name, call.criterion))
            info["token_usage"] = usage([chunk.generation])
        return LCGenerationChunk(text=chunk.text, generation_info=info)

    # -- sync --------------------------------------------------------------------------------------
    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._generate([prompt], stop=stop, run_manager=run_manager, **kwargs).generations[0][0].text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """All prompts in one engine call; with ``streaming=True`` tokens also reach the callbacks."""
        call = self._engine_call(stop, kwargs)
        if not (self.streaming and run_manager):
            return self._result(self.aligner.generate(list(prompts), **call.kwargs), call)
        results: list[Generation | None] = [None] * len(prompts)
        with closing(coalesce(self.aligner.stream_batch(list(prompts), **call.kwargs))) as chunks:
            for chunk in chunks:
                run_manager.on_llm_new_token(chunk.text, chunk=self._chunk(chunk, call, len(prompts)))
                if chunk.generation is not None:
                    results[chunk.index] = chunk.generation
        return self._result([r for r in results if r is not None], call)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[LCGenerationChunk]:
        call = self._engine_call(stop, kwargs)
        yield from self._pieces(prompt, call, run_manager)

    # -- async: straight to the engine's running batch; the event loop never blocks ---------------------
    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        call = self._engine_call(stop, kwargs)
        if not (self.streaming and run_manager):
            return self._result(await self.aligner.agenerate(list(prompts), **call.kwargs), call)
        results: list[Generation | None] = [None] * len(prompts)
        async for chunk in acoalesce(self.aligner.astream_batch(list(prompts), **call.kwargs)):
            await run_manager.on_llm_new_token(chunk.text, chunk=self._chunk(chunk, call, len(prompts)))
            if chunk.generation is not None:
                results[chunk.index] = chunk.generation
        return self._result([r for r in results if r is not None], call)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[LCGenerationChunk]:
        call = self._engine_call(stop, kwargs)
        async with aclosing(self._apieces(prompt, call, run_manager)) as pieces:
            async for piece in pieces:
                yield piece

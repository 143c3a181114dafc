"""Fields and helpers shared by :class:`ProxyAlignLLM` and :class:`ChatProxyAlign`.

What is not LangChain's (loading, validation, settings -> engine arguments) lives in
:mod:`proxyalign.adapters`; this module holds the pydantic fields LangChain needs and the parts both
LangChain classes share (call options, tracing parameters, the streaming loop).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.base import LangSmithParams
from proxyalign import GenerationChunk, adapters
from pydantic import BaseModel, ConfigDict, Field, model_validator

from langchain_proxyalign import _deadline

#: Call kwargs LangChain itself consumes before (or while) calling us.
IGNORED_CALL_KWARGS = frozenset({"stream"})
#: LangChain's name for the engine's ``max_new_tokens`` (the OpenAI spelling).
_RENAMED = {"max_new_tokens": "max_tokens"}


class ProxyAlignSettings(BaseModel):
    """Which models, which criterion, which sampling settings.

    Either ``aligner`` (a loaded :class:`proxyalign.ProxyAligner`, shared by any number of adapters)
    or ``base`` and ``aligned`` (model ids, directories or offline asset names; loaded once per process)
    must be given. Sampling fields left at ``None`` fall back to the aligner's defaults.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    aligner: Any = Field(default=None, exclude=True, description="A loaded ProxyAligner to share.")
    base: str | None = Field(default=None, description="Large base model p (id, directory or asset).")
    aligned: str | None = Field(default=None, description="Small aligned model q* (id, directory or asset).")
    small_base: str | None = Field(default=None, description="Small base model q, for criteria needing it.")
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More ProxyAligner.from_pretrained arguments: dtype, device, device_map, prompt_formats",
    )
    criterion: Any = Field(default=None, description="Criterion name or object; None: the aligner's.")
    criterion_params: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, description="Maximum new tokens (engine: max_new_tokens).")
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    criterion_on: str | None = None
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further ProxyAligner.generate options, e.g. a decoding mode."
    )
    streaming: bool = False

    #: ``ls_model_type`` of LangSmith traces.
    _ls_model_type: ClassVar[Literal["chat", "llm"]]

    @model_validator(mode="after")
    def _attach_aligner(self) -> ProxyAlignSettings:
        """Load (or reuse) the engine and validate settings at construction, not at the first call."""
        aligner, criterion = adapters.adapter_aligner(
            self.aligner, self.base, self.aligned, self.small_base, self.criterion, self.load_kwargs
        )
        if self.aligner is None:  # loaded from ids (assign only then: assigning marks a field as set)
            self.aligner, self.criterion = aligner, criterion
        adapters.check_settings(self.aligner, self._instance_settings(), self.engine_kwargs)
        return self

    @property
    def model_name(self) -> str:
        """Both models, base first."""
        return adapters.model_name(self.aligner)

    def _instance_settings(self) -> dict[str, Any]:
        return adapters.instance_settings(self, renamed=_RENAMED)

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        """Enough to tell two configurations apart: a LangChain cache key."""
        criterion = self.aligner.resolve_criterion(self.criterion, self.criterion_params)
        names = self.aligner.names
        settings = adapters.effective_settings(self.aligner, self._instance_settings())
        settings.pop("criterion", None)
        settings.pop("criterion_params", None)
        return {
            "model_name": self.model_name,
            "base": names.get("base"),
            "aligned": names.get("aligned"),
            "small_base": names.get("small_base"),
            "prompt_formats": dict(self.aligner.prompt_formats),
            "criterion": criterion.name,
            "criterion_params": dict(criterion.params),
            **settings,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith's standard trace fields: the model, and a call's temperature, max tokens and stop."""
        settings = adapters.effective_settings(self.aligner, self._instance_settings())
        model = kwargs.get("model")
        return LangSmithParams(
            ls_provider="proxyalign",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type=self._ls_model_type,
            ls_temperature=kwargs.get("temperature", settings["temperature"]),
            ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", settings["max_new_tokens"])),
            ls_stop=stop if stop is not None else settings["stop"],
        )

    def _engine_call(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> adapters.EngineCall:
        call = dict(kwargs)
        if stop is not None:
            call["stop"] = list(stop)
        return adapters.engine_call(
            self.aligner,
            self._instance_settings(),
            call,
            owner=type(self).__name__,
            ignored=IGNORED_CALL_KWARGS,
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Our tokenizer's ids (LangChain's default downloads a GPT-2 tokenizer, or counts 0 offline)."""
        custom = getattr(self, "custom_get_token_ids", None)
        if custom is not None:
            return custom(text)
        return adapters.token_ids(self.aligner, text)

    # -- one prompt's stream, as this class's chunks (``_chunk``) -------------------------------------
    def _chunk(self, chunk: GenerationChunk, call: adapters.EngineCall) -> Any:
        """One engine chunk as this class's LangChain chunk (each class defines its own)."""
        raise NotImplementedError

    def _engine_stream(self, prompt: Any, call: adapters.EngineCall) -> Iterator[GenerationChunk]:
        """The engine's stream of ``prompt``, within the call's ``timeout`` when it has one (the request
        is checked and tokenized here, in the caller's thread, either way)."""
        timeout = getattr(call, "timeout", None)
        if timeout is None:
            return self.aligner.stream(prompt, **call.kwargs)
        requests = self.aligner.requests([prompt], **call.kwargs)
        owner = type(self).__name__
        return _deadline.stream(lambda: self.aligner.astream_requests(requests), timeout, owner)

    def _engine_astream(self, prompt: Any, call: adapters.EngineCall) -> AsyncIterator[GenerationChunk]:
        """:meth:`_engine_stream` for asyncio."""
        chunks = self.aligner.astream(prompt, **call.kwargs)
        timeout = getattr(call, "timeout", None)
        return chunks if timeout is None else _deadline.astream(chunks, timeout, type(self).__name__)

    def _pieces(
        self, prompt: Any, call: adapters.EngineCall, run_manager: CallbackManagerForLLMRun | None = None
    ) -> Iterator[Any]:
        """The engine's stream of ``prompt`` as LangChain chunks, each also sent to ``run_manager`` when
        given (an ``LLM`` reports its own tokens; a chat model's ``stream`` reports them for it).
        Closing this generator aborts the request."""
        with closing(adapters.coalesce(self._engine_stream(prompt, call))) as chunks:
            for chunk in chunks:
                piece = self._chunk(chunk, call)
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=piece)
                yield piece

    async def _apieces(
        self,
        prompt: Any,
        call: adapters.EngineCall,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
    ) -> AsyncIterator[Any]:
        """:meth:`_pieces` on the engine's async stream."""
        async with aclosing(adapters.acoalesce(self._engine_astream(prompt, call))) as chunks:
            async for chunk in chunks:
                piece = self._chunk(chunk, call)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=piece)
                yield piece


def combine_llm_outputs(outputs: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Sum token usage over the results of several prompts."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    name = None
    for output in outputs:
        if not output:
            continue
        name = output.get("model_name", name)
        for key, value in (output.get("token_usage") or {}).items():
            total[key] = total.get(key, 0) + value
    return {"token_usage": total, "model_name": name}

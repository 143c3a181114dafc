"""``ProxyAlign``: the hybrid decoder as a LlamaIndex ``CustomLLM``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from proxyalign import Generation, GenerationChunk, ProxyAligner, Source, adapters

__all__ = ["ProxyAlign", "to_engine_messages"]

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}
_NO_TOOLS = (
    "ProxyAlign does not support tool calling or structured output: the two models decode plain "
    "text token by token. Use a text-based agent/parser, or parse the response text yourself."
)


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages -> the engine's chat prompt (``[{"role", "content"}, ...]``)."""
    converted = []
    for message in messages:
        if message.role not in _ROLES:
            raise NotImplementedError(f"{_NO_TOOLS} (got a {message.role.value!r} message)")
        for block in message.blocks:
            if not isinstance(block, TextBlock):
                raise NotImplementedError(
                    f"ProxyAlign handles text only: the hybrid decoder has no image, audio or document "
                    f"inputs (got a {type(block).__name__})"
                )
        converted.append({"role": _ROLES[message.role], "content": message.content or ""})
    return converted


class ProxyAlign(CustomLLM):
    """A large base model decoding with a small aligned model's alignment, as a LlamaIndex LLM.

    Build it from model ids/paths (``base=..., aligned=...``; loaded once per process and shared) or
    around a loaded :class:`proxyalign.ProxyAligner` (``aligner=...``), so several LLMs with different
    criteria share one pair of models. Settings left at ``None`` use the aligner's defaults; every
    call accepts the engine's options as kwargs (``criterion=``, ``temperature=``, ``stop=``, ...).
    Chat messages are rendered with the aligned model's chat template.

    >>> from proxyalign.testing import tiny_aligner
    >>> llm = ProxyAlign(aligner=tiny_aligner(), max_new_tokens=4, temperature=0)
    >>> llm.metadata.num_output
    4
    """

    # Unknown constructor arguments are errors: a misspelt setting must not silently do nothing.
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    base: str | None = Field(default=None, description="Large base model p (id, directory or asset).")
    aligned: str | None = Field(default=None, description="Small aligned model q* (id, directory or asset).")
    small_base: str | None = Field(default=None, description="Small base model q, for criteria needing it.")
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More ProxyAligner.from_pretrained arguments: dtype, device, device_map, prompt_formats",
    )
    criterion: str | None = Field(default=None, description="Criterion name; None: the aligner's default.")
    criterion_params: dict[str, Any] | None = Field(default=None, description="The criterion's parameters.")
    max_new_tokens: int | None = Field(
        default=None, description="Maximum new tokens (LlamaIndex num_output)."
    )
    temperature: float | None = Field(default=None, description="0 is greedy.")
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default=None, description="Stop strings, cut from the output.")
    criterion_on: str | None = None
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further ProxyAligner.generate options, e.g. a decoding mode."
    )
    context_window: int | None = Field(
        default=None, description="Report a smaller context window than the models' (never a larger one)."
    )

    _aligner: ProxyAligner = PrivateAttr()

    def __init__(self, aligner: ProxyAligner | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._aligner, criterion = adapters.adapter_aligner(
            aligner, self.base, self.aligned, self.small_base, self.criterion, self.load_kwargs
        )
        if aligner is None:  # loaded from ids: report the criterion the pair was loaded with
            self.criterion = criterion
        settings = self._instance_settings()  # every setting checked now, not at the first call
        adapters.check_settings(self._aligner, settings, self.engine_kwargs, list_accepted=False)

    @classmethod
    def class_name(cls) -> str:
        return "ProxyAlign"

    @property
    def aligner(self) -> ProxyAligner:
        """The shared engine (models, tokenizer, defaults)."""
        return self._aligner

    @property
    def metadata(self) -> LLMMetadata:
        """What LlamaIndex's prompt helper and query engines plan with."""
        window = adapters.min_context_window(self._aligner) or 4096
        if self.context_window is not None:
            window = min(window, self.context_window)
        return LLMMetadata(
            context_window=window,
            num_output=self._settings()["max_new_tokens"],
            is_chat_model=self._chat_native(),
            is_function_calling_model=False,
            model_name=adapters.model_name(self._aligner),
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Our tokenizer, e.g. ``Settings.tokenizer = llm.get_token_ids`` for exact chunk sizes."""
        return adapters.token_ids(self._aligner, text)

    # -- settings ----------------------------------------------------------------------------------
    def _instance_settings(self) -> dict[str, Any]:
        return adapters.instance_settings(self)

    def _settings(self) -> dict[str, Any]:
        return adapters.effective_settings(self._aligner, self._instance_settings())

    def _call(self, kwargs: dict[str, Any]) -> adapters.EngineCall:
        return adapters.engine_call(self._aligner, self._instance_settings(), kwargs, owner="ProxyAlign")

    def _chat_native(self) -> bool:
        """Chats reach the aligned model as messages (its chat template) unless it takes plain text."""
        has_template = getattr(self._aligner.tokenizer, "chat_template", None) is not None
        return has_template and self._aligner.prompt_formats["aligned"] != "plain"

    # -- responses ---------------------------------------------------------------------------------
    def _raw(self, generation: Generation, call: adapters.EngineCall) -> dict[str, Any]:
        """``raw``: usage where LlamaIndex's token counter looks, plus provenance and statistics."""
        return {
            "usage": adapters.usage([generation]),
            **adapters.completion_info(generation, adapters.model_name(self._aligner), call.criterion),
        }

    def _completion(self, generation: Generation, call: adapters.EngineCall) -> CompletionResponse:
        return CompletionResponse(
            text=generation.text,
            raw=self._raw(generation, call),
            additional_kwargs=adapters.usage([generation]),
        )

    def _stream(self, prompt: Any, call: adapters.EngineCall) -> Iterator[CompletionResponse]:
        """Deltas as the engine releases them. Like ``text``, ``raw["token_ids"/"token_sources"]`` grow
        with the stream (``raw["delta_token_*"]`` are this step's); the last response adds usage and
        statistics."""
        responses = _Responses(self, call)
        with closing(adapters.coalesce(self._aligner.stream(prompt, **call.kwargs))) as chunks:
            for chunk in chunks:
                yield responses.add(chunk)

    async def _astream(self, prompt: Any, call: adapters.EngineCall) -> AsyncIterator[CompletionResponse]:
        """:meth:`_stream` on the engine's async stream: closing it aborts the request."""
        responses = _Responses(self, call)
        async for chunk in adapters.acoalesce(self._aligner.astream(prompt, **call.kwargs)):
            yield responses.add(chunk)

    @staticmethod
    def _as_chat(response: CompletionResponse) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
            delta=response.delta,
            raw=response.raw,
            additional_kwargs=response.additional_kwargs,
        )

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> Any:
        """Messages for models that take a chat template; ``messages_to_prompt`` text for plain ones."""
        converted = to_engine_messages(messages)  # also refuses tool messages and non-text blocks
        if not self._chat_native():
            return self.messages_to_prompt(messages)
        return adapters.chat_prompt(self._aligner, converted, lambda: self.messages_to_prompt(messages))

    def _complete_prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    # -- sync --------------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._call(kwargs)
        text = self._complete_prompt(prompt, formatted)
        return self._completion(self._aligner.generate([text], **call.kwargs)[0], call)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call = self._call(kwargs)
        return self._stream(self._complete_prompt(prompt, formatted), call)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._call(kwargs)
        generation = self._aligner.generate([self._chat_prompt(messages)], **call.kwargs)[0]
        return self._as_chat(self._completion(generation, call))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._call(kwargs)
        prompt = self._chat_prompt(messages)
        return (self._as_chat(response) for response in self._stream(prompt, call))

    # -- async: straight to the engine's running batch; the event loop never blocks ---------------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        call = self._call(kwargs)
        text = self._complete_prompt(prompt, formatted)
        generations = await self._aligner.agenerate([text], **call.kwargs)
        return self._completion(generations[0], call)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        call = self._call(kwargs)
        return self._astream(self._complete_prompt(prompt, formatted), call)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._call(kwargs)
        generations = await self._aligner.agenerate([self._chat_prompt(messages)], **call.kwargs)
        return self._as_chat(self._completion(generations[0], call))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = self._call(kwargs)
        prompt = self._chat_prompt(messages)

        async def responses() -> ChatResponseAsyncGen:
            async for response in self._astream(prompt, call):
                yield self._as_chat(response)

        return responses()

    # -- unsupported features: say so instead of doing something odd -----------------------------------
    def structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)

    async def astructured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)

    def stream_structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)

    async def astream_structured_predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)

    def as_structured_llm(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)

    def predict_and_call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)

    async def apredict_and_call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NO_TOOLS)


class _Responses:
    """Accumulates a stream's text and provenance into LlamaIndex responses."""

    def __init__(self, llm: ProxyAlign, call: adapters.EngineCall) -> None:
        self.llm, self.call = llm, call
        self.text = ""
        self.token_ids: list[int] = []
        self.sources: list[Source] = []

    def add(self, chunk: GenerationChunk) -> CompletionResponse:
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.sources += chunk.sources
        raw = {
            **adapters.provenance(self.token_ids, self.sources),
            **{f"delta_{k}": v for k, v in adapters.provenance(chunk.token_ids, chunk.sources).items()},
        }
        usage = {}
        if chunk.generation is not None:
            raw.update(self.llm._raw(chunk.generation, self.call))
            usage = adapters.usage([chunk.generation])
        return CompletionResponse(text=self.text, delta=chunk.text, raw=raw, additional_kwargs=usage)

"""``ChatProxyAlign``: the hybrid decoder as a LangChain chat model.

Messages are handed to the engine as ``{"role", "content"}`` dicts, which it renders with the aligned
model's chat template. Every call, sync or async, joins the engine's one running batch, so LangChain's
``batch``/``abatch`` (one invoke per prompt, in threads or tasks) decode side by side.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    ToolMessage,
    get_buffer_string,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable
from proxyalign import Generation, GenerationChunk
from proxyalign.adapters import EngineCall, chat_prompt, completion_info, provenance, summary, usage
from proxyalign.prompts import tokenize_prompt
from pydantic import ConfigDict, Field

from langchain_proxyalign._settings import ProxyAlignSettings, combine_llm_outputs

__all__ = ["ChatProxyAlign", "to_engine_messages", "transcript"]

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}
_ROLES |= {"system": "system", "developer": "system"}
_NOT_TEXT = (
    "ChatProxyAlign handles text only: the hybrid decoder has no image, audio or file inputs "
    "(got a {!r} content block)"
)
_NO_TOOLS = (
    "ChatProxyAlign does not support tool calling or structured output: the two models decode "
    "plain text token by token. Parse the text yourself (e.g. with an output parser)."
)


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise NotImplementedError(_NOT_TEXT.format(kind))
    return "".join(parts)


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> the engine's chat prompt (``[{"role", "content"}, ...]``)."""
    converted = []
    for message in messages:
        if isinstance(message, (ToolMessage, FunctionMessage)) or getattr(message, "tool_calls", None):
            raise NotImplementedError(_NO_TOOLS)
        role = message.role if isinstance(message, ChatMessage) else message.type
        if role not in _ROLES:
            raise ValueError(
                f"cannot map a {role!r} message to a chat role; use system, human or ai messages"
            )
        converted.append({"role": _ROLES[role], "content": _text(message)})
    return converted


def transcript(messages: Sequence[BaseMessage]) -> str:
    """A chat as plain text, for a model prompted without a chat template."""
    return get_buffer_string(messages, human_prefix="User", ai_prefix="Assistant") + "\nAssistant:"


class ChatProxyAlign(ProxyAlignSettings, BaseChatModel):
    """A large base model decoding with a small aligned model's alignment, as a LangChain chat model.

    Build it from model ids/paths (``base=..., aligned=...``; loaded once per process and shared) or
    around an existing :class:`proxyalign.ProxyAligner` (``aligner=...``). Criterion, its parameters
    and sampling settings can be set per instance or per call (``.bind(criterion="nudging")``).

    >>> from proxyalign.testing import tiny_aligner
    >>> chat = ChatProxyAlign(aligner=tiny_aligner(), max_tokens=4, temperature=0)
    >>> chat.invoke("w5 w6").usage_metadata["output_tokens"] <= 4
    True
    """

    # Unknown constructor arguments are errors: a misspelt setting must not silently do nothing.
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())
    _ls_model_type: ClassVar[Literal["chat", "llm"]] = "chat"

    messages_to_prompt: Callable[[list[BaseMessage]], str] | None = Field(
        default=None,
        exclude=True,
        description="Text of a chat for models whose prompt format is 'plain' (e.g. the base model); "
        "default: a System/User/Assistant transcript ending in 'Assistant:'.",
    )

    @property
    def _llm_type(self) -> str:
        return "proxyalign-chat"

    # -- token counting ----------------------------------------------------------------------------
    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt exactly as the aligned model sees it (chat template included)."""
        if tools:
            raise NotImplementedError(_NO_TOOLS)
        prompt = self._prompt(messages)
        if isinstance(prompt, Mapping):
            prompt = prompt["aligned"]
        fmt = self.aligner.prompt_formats["aligned"]
        return len(tokenize_prompt(prompt, fmt, self.aligner.tokenizer))

    # -- unsupported features: say so instead of doing something odd -----------------------------------
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        raise NotImplementedError(_NO_TOOLS)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        raise NotImplementedError(_NO_TOOLS)

    # -- results -----------------------------------------------------------------------------------
    @staticmethod
    def _usage(generation: Generation) -> UsageMetadata:
        counts = usage([generation])
        return UsageMetadata(
            input_tokens=counts["prompt_tokens"],
            output_tokens=counts["completion_tokens"],
            total_tokens=counts["total_tokens"],
        )

    def _result(self, generation: Generation, call: EngineCall) -> ChatResult:
        info = completion_info(generation, self.model_name, call.criterion)
        message = AIMessage(content=generation.text, usage_metadata=self._usage(generation))
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=info)],
            llm_output={"token_usage": usage([generation]), "model_name": self.model_name},
        )

    def _combine_llm_outputs(self, llm_outputs: list[dict | None]) -> dict:
        return combine_llm_outputs(llm_outputs)

    def _prompt(self, messages: Sequence[BaseMessage]) -> Any:
        """The engine prompt: messages (the aligned chat template), text for plain-format models."""
        as_text = self.messages_to_prompt or transcript
        return chat_prompt(self.aligner, to_engine_messages(messages), lambda: as_text(list(messages)))

    # -- sync / async generation: every call joins the engine's running batch -------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._engine_call(stop, kwargs)
        return self._result(self.aligner.generate([self._prompt(messages)], **call.kwargs)[0], call)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Awaits the engine (never blocks the event loop); cancelling the call aborts its row."""
        call = self._engine_call(stop, kwargs)
        generations = await self.aligner.agenerate([self._prompt(messages)], **call.kwargs)
        return self._result(generations[0], call)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """One chunk per new piece of text; LangChain forwards each to ``on_llm_new_token``.

        Steps whose text is held back (it might begin a stop string) carry their token provenance over
        to the next chunk. The last chunk has the usage, the statistics and ``chunk_position="last"``.
        """
        call = self._engine_call(stop, kwargs)
        yield from self._pieces(self._prompt(messages), call)  # BaseChatModel reports the tokens

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = self._engine_call(stop, kwargs)
        async with aclosing(self._apieces(self._prompt(messages), call)) as pieces:
            async for piece in pieces:
                yield piece

    def _chunk(self, chunk: GenerationChunk, call: EngineCall) -> ChatGenerationChunk:
        info: dict[str, Any] = provenance(chunk.token_ids, chunk.sources)
        message = AIMessageChunk(content=chunk.text)
        if chunk.generation is not None:
            info.update(summary(chunk.generation, self.model_name, call.criterion))
            message = AIMessageChunk(
                content=chunk.text, usage_metadata=self._usage(chunk.generation), chunk_position="last"
            )
        return ChatGenerationChunk(message=message, generation_info=info)

    # -- several prompts of one legacy ``generate`` call: side by side, not one after another ------------
    def generate(
        self,
        messages: list[list[BaseMessage]],
        stop: list[str] | None = None,
        callbacks: Any = None,
        **kwargs: Any,
    ) -> LLMResult:
        """LangChain's chat ``generate`` decodes its prompts one after another; here each prompt is a
        call of its own in a thread of its own, so they all join the engine's running batch (``batch``
        and ``agenerate`` do this already). Callbacks, caching and tracing are LangChain's, per prompt."""
        if len(messages) < 2:
            return super().generate(messages, stop=stop, callbacks=callbacks, **kwargs)

        def one(prompt: list[BaseMessage]) -> LLMResult:
            return BaseChatModel.generate(self, [prompt], stop=stop, callbacks=callbacks, **kwargs)

        with ThreadPoolExecutor(max_workers=len(messages)) as pool:
            contexts = [contextvars.copy_context() for _ in messages]
            results = list(pool.map(lambda c, m: c.run(one, m), contexts, messages))
        return LLMResult(
            generations=[result.generations[0] for result in results],
            llm_output=self._combine_llm_outputs([result.llm_output for result in results]),
            run=[info for result in results for info in (result.run or [])],
        )

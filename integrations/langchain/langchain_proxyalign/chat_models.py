"""``ChatProxyAlign``: the hybrid decoder as a LangChain chat model.

Messages are handed to the engine as OpenAI-style dicts (tool calls and tool results included), which it
renders with each model's chat template. Every call, sync or async, joins the engine's one running
batch, so LangChain's ``batch``/``abatch`` (one invoke per prompt, in threads or tasks) decode side by
side. Tools (``bind_tools``) and output formats (``with_structured_output``) are the engine's: a forced
tool choice or a response format constrains every token by grammar.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, closing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable
from proxyalign import Generation, GenerationChunk
from proxyalign.adapters import EngineCall, chat_prompt, completion_info, provenance, summary, usage
from proxyalign.errors import InvalidParameterError
from proxyalign.prompts import tokenize_prompt
from proxyalign.tools import normalize_tools
from pydantic import ConfigDict, Field, SecretStr

from langchain_proxyalign import _deadline
from langchain_proxyalign._calls import (
    check_timeout,
    openai_tools,
    split_call_arguments,
    tool_choice_option,
)
from langchain_proxyalign._messages import (
    has_tool_turns,
    invalid_tool_calls,
    to_engine_messages,
    tool_call_chunks,
    tool_calls,
    transcript,
)
from langchain_proxyalign._settings import ProxyAlignSettings, combine_llm_outputs
from langchain_proxyalign._structured import closed, structured_output

__all__ = ["ChatProxyAlign", "to_engine_messages", "transcript"]

#: Bound kwargs that LangChain takes out of a call before it reaches the model.
_LANGCHAIN_KWARGS = frozenset({"ls_structured_output_format", "structured_output_format"})


def bound_tools(
    tools: Sequence[Any], strict: bool | None = None, forced: bool = False
) -> list[dict[str, Any]]:
    """Tools as ``bind_tools`` offers them, in OpenAI's shape (``strict=True``: LangChain's OpenAI strict
    mode). For a ``forced`` choice their parameter objects are closed unless ``strict=False``: the
    grammar then keeps the call from wandering into arguments the tool does not take. Unforced, the
    schemas stay as given: nothing constrains the output, and the prompt shows the tools as written."""
    formatted = openai_tools(tools, strict)
    if forced and strict is None:
        for tool in formatted:
            tool["function"]["parameters"] = closed(tool["function"].get("parameters", {}))
    return formatted


@dataclass(frozen=True)
class ChatCall(EngineCall):
    """A chat call's engine arguments (tools and response format included) and its time limit."""

    timeout: float | None = None

    @property
    def offers_tools(self) -> bool:
        return bool(self.kwargs.get("tools")) and self.kwargs.get("tool_choice") != "none"


class ChatProxyAlign(ProxyAlignSettings, BaseChatModel):
    """A large base model decoding with a small aligned model's alignment, as a LangChain chat model.

    Build it from model ids/paths (``base=..., aligned=...``; loaded once per process and shared) or
    around an existing :class:`proxyalign.ProxyAligner` (``aligner=...``). Criterion, its parameters
    and sampling settings can be set per instance or per call (``.bind(criterion="nudging")``).
    ``bind_tools`` and ``with_structured_output`` work as for LangChain's tool-calling models; forced
    calls and output formats are enforced by grammar in the engine.

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
    timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a call may take, from submission to its last token; past it the row is "
        "aborted and TimeoutError raised. None: no limit. Also a per-call argument.",
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        description="Accepted for code written for remote models; a local model has no failed requests "
        "to retry, so it does nothing.",
    )
    api_key: SecretStr | None = Field(
        default=None, exclude=True, description="Accepted for code written for remote models; unused."
    )

    @property
    def _llm_type(self) -> str:
        return "proxyalign-chat"

    # -- token counting ----------------------------------------------------------------------------
    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt exactly as the aligned model sees it (chat template and tools included)."""
        offered = normalize_tools(bound_tools(tools)) if tools else None
        prompt = self._prompt(messages, tools_offered=bool(offered))
        if isinstance(prompt, Mapping):
            prompt = prompt["aligned"]
        fmt = self.aligner.prompt_formats["aligned"]
        return len(tokenize_prompt(prompt, fmt, self.aligner.tokenizer, tools=offered))

    # -- tools and structured output ------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` (LangChain tools, functions, pydantic classes or OpenAI dicts) on every call.

        ``tool_choice``: None or "auto" (the model decides), "none", "any"/"required" (at least one
        call), a tool's name or ``{"type": "function", "function": {"name": ...}}`` (exactly one call to
        it), ``True`` (the single tool). Forced choices are enforced by grammar, so their calls always
        parse and match the tool's schema; their parameter objects are closed (``additionalProperties:
        false``) unless ``strict=False`` keeps the schemas as given. ``strict=True`` is LangChain's
        OpenAI strict mode (closed, and every property required).
        """
        names = [tool["function"]["name"] for tool in openai_tools(tools)]
        choice = tool_choice_option(tool_choice, names)
        forced = choice not in (None, "auto", "none")
        options: dict[str, Any] = {"tools": bound_tools(tools, strict, forced), **kwargs}
        if choice is not None:
            options["tool_choice"] = choice
        if parallel_tool_calls is not None:
            options["parallel_tool_calls"] = parallel_tool_calls
        # Refuse bad tools or arguments now, not at the first call (LangChain's own kwargs aside).
        call = self._engine_call(None, {k: v for k, v in options.items() if k not in _LANGCHAIN_KWARGS})
        self.aligner.check_options(**call.kwargs)
        return self.bind(**options)

    def with_structured_output(
        self,
        schema: Any = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers as ``schema`` (a pydantic class, a TypedDict or a JSON schema): a pydantic instance,
        else a dict; ``include_raw=True`` gives ``{"raw", "parsed", "parsing_error"}`` instead.

        ``method``: "json_schema" (default; the output is constrained to the schema), "function_calling"
        (a forced call to the schema's tool) or "json_mode" (constrained to some JSON object; the prompt
        should say which keys). See the package README.
        """
        if kwargs:
            raise InvalidParameterError(
                f"with_structured_output got unknown argument(s) {sorted(kwargs)}; accepted: schema, "
                "method, include_raw, strict"
            )
        return structured_output(self, schema, method, include_raw, strict)

    # -- calls -------------------------------------------------------------------------------------
    def _engine_call(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> ChatCall:
        """Settings, tools and formats, and the time limit of one call (OpenAI's arguments sorted out)."""
        arguments = split_call_arguments(kwargs, type(self).__name__)
        call = super()._engine_call(stop, arguments.settings)
        timeout = arguments.timeout if arguments.timeout is not None else check_timeout(self.timeout)
        return ChatCall({**call.kwargs, **arguments.formats}, call.criterion, timeout)

    def _prompt(self, messages: Sequence[BaseMessage], tools_offered: bool = False) -> Any:
        """The engine prompt: the messages (each model's chat template), text for plain-format models.

        With tools or tool turns and no ``messages_to_prompt``, every model gets the messages: the engine
        writes plain-format models a transcript that shows the tools and the calls.
        """
        chat = to_engine_messages(messages)
        if self.messages_to_prompt is None and (tools_offered or has_tool_turns(chat)):
            return chat
        as_text = self.messages_to_prompt or transcript
        return chat_prompt(self.aligner, chat, lambda: as_text(list(messages)))

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
        message = AIMessage(
            content=generation.content or "",
            tool_calls=tool_calls(generation.tool_calls),
            invalid_tool_calls=invalid_tool_calls(generation.tool_call_errors),
            usage_metadata=self._usage(generation),
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=info)],
            llm_output={"token_usage": usage([generation]), "model_name": self.model_name},
        )

    def _combine_llm_outputs(self, llm_outputs: list[dict | None]) -> dict:
        return combine_llm_outputs(llm_outputs)

    def _chunk(self, chunk: GenerationChunk, call: EngineCall) -> ChatGenerationChunk:
        info: dict[str, Any] = provenance(chunk.token_ids, chunk.sources)
        fields: dict[str, Any] = {
            "content": chunk.text if chunk.content is None else chunk.content,
            "tool_call_chunks": tool_call_chunks(chunk.tool_calls),
        }
        if chunk.generation is not None:
            info.update(summary(chunk.generation, self.model_name, call.criterion))
            fields.update(usage_metadata=self._usage(chunk.generation), chunk_position="last")
        return ChatGenerationChunk(message=AIMessageChunk(**fields), generation_info=info)

    # -- sync / async generation: every call joins the engine's running batch -------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._engine_call(stop, kwargs)
        prompt = self._prompt(messages, call.offers_tools)
        if call.timeout is None:
            return self._result(self.aligner.generate([prompt], **call.kwargs)[0], call)
        with closing(self._engine_stream(prompt, call)) as chunks:  # a stream can be cut off in time
            generation = next(c.generation for c in chunks if c.generation is not None)
        return self._result(generation, call)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Awaits the engine (never blocks the event loop); cancelling the call aborts its row."""
        call = self._engine_call(stop, kwargs)
        pending = self.aligner.agenerate([self._prompt(messages, call.offers_tools)], **call.kwargs)
        if call.timeout is not None:
            pending = _deadline.abounded(pending, call.timeout, type(self).__name__)
        return self._result((await pending)[0], call)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """One chunk per new piece of text or of a tool call; LangChain forwards each to
        ``on_llm_new_token``.

        Steps whose text is held back (it might begin a stop string or a tool call) carry their token
        provenance over to the next chunk. A call comes as ``tool_call_chunks`` once it is known to be
        well formed. The last chunk has the usage, the statistics and ``chunk_position="last"``.
        """
        call = self._engine_call(stop, kwargs)
        yield from self._pieces(self._prompt(messages, call.offers_tools), call)  # LangChain reports tokens

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = self._engine_call(stop, kwargs)
        async with aclosing(self._apieces(self._prompt(messages, call.offers_tools), call)) as pieces:
            async for piece in pieces:
                yield piece

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

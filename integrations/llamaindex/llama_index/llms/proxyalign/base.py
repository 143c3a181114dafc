"""``ProxyAlign``: the hybrid decoder as a LlamaIndex ``FunctionCallingLLM``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_index.core.instrumentation as instrument
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
)
from llama_index.core.bridge.pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import PydanticProgramMode

from llama_index.llms.proxyalign import structured
from llama_index.llms.proxyalign.messages import (
    assistant_message,
    has_tool_turns,
    message_tool_calls,
    single_call,
    to_engine_messages,
)
from proxyalign import Generation, GenerationChunk, ProxyAligner, Source, adapters
from proxyalign.tools import ToolCall, ToolCallDelta

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["ProxyAlign", "to_engine_messages"]

dispatcher = instrument.get_dispatcher(__name__)


class ProxyAlign(FunctionCallingLLM):
    """A large base model decoding with a small aligned model's alignment, as a LlamaIndex LLM.

    Build it from model ids/paths (``base=..., aligned=...``; loaded once per process and shared) or
    around a loaded :class:`proxyalign.ProxyAligner` (``aligner=...``), so several LLMs with different
    criteria share one pair of models. Settings left at ``None`` use the aligner's defaults; every
    call accepts the engine's options as kwargs (``criterion=``, ``temperature=``, ``stop=``, ...).
    Chat messages are rendered with the aligned model's chat template. Tools go to the engine as OpenAI
    tools; forced tool choices and structured output are decoded under a grammar (the engine's
    ``tool_choice`` and ``response_format``), so ``FunctionAgent``, ``structured_predict`` and
    ``as_structured_llm`` work.

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
            is_function_calling_model=True,
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
        """The engine arguments of one call; tools and output formats are passed on as given (the engine
        checks them before decoding)."""
        return adapters.engine_call(self._aligner, self._instance_settings(), kwargs, owner="ProxyAlign")

    def _chat_native(self) -> bool:
        """Chats reach the aligned model as messages (its chat template) unless it takes plain text."""
        has_template = getattr(self._aligner.tokenizer, "chat_template", None) is not None
        return has_template and self._aligner.prompt_formats["aligned"] != "plain"

    # -- responses ---------------------------------------------------------------------------------
    def _raw(self, generation: Generation, call: adapters.EngineCall) -> dict[str, Any]:
        """``raw``: usage where LlamaIndex's token counter looks, plus provenance and statistics; with
        tools, the calls and the malformed call blocks the reply also holds."""
        raw = {
            "usage": adapters.usage([generation]),
            **adapters.completion_info(generation, adapters.model_name(self._aligner), call.criterion),
        }
        if call.kwargs.get("tools"):
            raw["tool_calls"] = [c.to_openai() for c in generation.tool_calls]
            raw["tool_call_errors"] = [issue.message for issue in generation.tool_call_errors]
        return raw

    def _completion(self, generation: Generation, call: adapters.EngineCall) -> CompletionResponse:
        return CompletionResponse(
            text=generation.text,
            raw=self._raw(generation, call),
            additional_kwargs=adapters.usage([generation]),
        )

    def _chat_response(self, generation: Generation, call: adapters.EngineCall) -> ChatResponse:
        """The reply's text outside tool calls as content, its calls as blocks and ``tool_calls``."""
        return ChatResponse(
            message=assistant_message(generation.content or "", generation.tool_calls),
            raw=self._raw(generation, call),
            additional_kwargs=adapters.usage([generation]),
        )

    def _chunks(self, prompt: Any, call: adapters.EngineCall) -> Iterator[GenerationChunk]:
        """The engine's stream with empty steps folded away; closing this aborts the request."""
        with closing(adapters.coalesce(self._aligner.stream(prompt, **call.kwargs))) as chunks:
            yield from chunks

    def _stream(self, prompt: Any, call: adapters.EngineCall) -> Iterator[CompletionResponse]:
        """Deltas as the engine releases them. Like ``text``, ``raw["token_ids"/"token_sources"]`` grow
        with the stream (``raw["delta_token_*"]`` are this step's); the last response adds usage and
        statistics."""
        responses = _Responses(self, call)
        for chunk in self._chunks(prompt, call):
            yield responses.completion(chunk)

    def _stream_chat(self, prompt: Any, call: adapters.EngineCall) -> Iterator[ChatResponse]:
        """:meth:`_stream` as chat replies: deltas of content, tool calls as the engine releases them."""
        responses = _Responses(self, call)
        for chunk in self._chunks(prompt, call):
            yield responses.chat(chunk)

    def _achunks(self, prompt: Any, call: adapters.EngineCall) -> AsyncIterator[GenerationChunk]:
        """:meth:`_chunks` on the engine's async stream: closing it aborts the request."""
        return adapters.acoalesce(self._aligner.astream(prompt, **call.kwargs))

    async def _astream(self, prompt: Any, call: adapters.EngineCall) -> AsyncIterator[CompletionResponse]:
        responses = _Responses(self, call)
        async for chunk in self._achunks(prompt, call):
            yield responses.completion(chunk)

    async def _astream_chat(self, prompt: Any, call: adapters.EngineCall) -> AsyncIterator[ChatResponse]:
        responses = _Responses(self, call)
        async for chunk in self._achunks(prompt, call):
            yield responses.chat(chunk)

    def _chat_prompt(self, messages: Sequence[ChatMessage], call: adapters.EngineCall) -> Any:
        """Messages for models that take a chat template; ``messages_to_prompt`` text for plain ones.

        With tools offered or tool turns in the chat, the engine gets the messages whatever the formats:
        it writes tools and calls into each model's prompt its own way (docs/tools.md)."""
        converted = to_engine_messages(messages)  # also refuses non-text blocks
        offered = bool(call.kwargs.get("tools")) and call.kwargs.get("tool_choice") != "none"
        if offered or has_tool_turns(converted):
            return converted
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
        generation = self._aligner.generate([self._chat_prompt(messages, call)], **call.kwargs)[0]
        return self._chat_response(generation, call)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._call(kwargs)
        return self._stream_chat(self._chat_prompt(messages, call), call)

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
        generations = await self._aligner.agenerate([self._chat_prompt(messages, call)], **call.kwargs)
        return self._chat_response(generations[0], call)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = self._call(kwargs)
        return self._astream_chat(self._chat_prompt(messages, call), call)

    # -- tools: FunctionCallingLLM -----------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments offering ``tools``: OpenAI tool specs and the engine's ``tool_choice``.

        ``tool_required`` means ``"required"`` unless a ``tool_choice`` is given (a tool's name, a
        ``{"type": "function", ...}`` dict, ``"auto"``, ``"none"``, ``"required"``). A required call
        to the only tool, without parallel calls, names that tool, so the grammar allows exactly one.
        """
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg)
                if isinstance(user_msg, str)
                else user_msg
            )
        specs = [_tool_spec(tool) for tool in tools]
        if not specs:
            return {"messages": messages, **kwargs}
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        if tool_choice in ("required", "any") and not allow_parallel_tool_calls and len(specs) == 1:
            tool_choice = specs[0]["function"]["name"]
        return {"messages": messages, "tools": specs, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Without parallel calls, only the first call is kept (as LlamaIndex's OpenAI LLM does)."""
        if not allow_parallel_tool_calls:
            response.message = single_call(response.message)
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The reply's calls; none raises ``ValueError`` unless ``error_on_no_tool_call=False``."""
        calls = message_tool_calls(response.message)
        if not calls and error_on_no_tool_call:
            raw = response.raw if isinstance(response.raw, dict) else {}
            problems = raw.get("tool_call_errors")
            detail = f"; malformed call blocks: {'; '.join(problems)}" if problems else ""
            raise ValueError(
                f"Expected at least one tool call, but got 0 tool calls (the model answered "
                f"{response.message.content!r}{detail}). Pass tool_required=True or a tool_choice to "
                "force a call."
            )
        return calls

    # -- structured output: constrained by the output class's JSON schema ------------------------------
    def _constrains_output(self) -> bool:
        """The default program mode decodes under the schema; the others run LlamaIndex's programs
        (``FUNCTION``: a forced call of a tool built from the class, also under a grammar)."""
        return self.pydantic_program_mode == PydanticProgramMode.DEFAULT

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        """An ``output_cls`` decoded under its JSON schema (``response_format``)."""
        if not self._constrains_output():
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        program = structured.program(self, output_cls, prompt)
        result = program(llm_kwargs=structured.program_kwargs(output_cls, llm_kwargs), **prompt_args)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        """:meth:`structured_predict` for asyncio."""
        if not self._constrains_output():
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        program = structured.program(self, output_cls, prompt)
        result = await program.acall(
            llm_kwargs=structured.program_kwargs(output_cls, llm_kwargs), **prompt_args
        )
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    def _structured_stream_call(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        """``stream_structured_predict``'s partial objects, from a reply decoded under the schema."""
        if not self._constrains_output():
            return super()._structured_stream_call(output_cls, prompt, llm_kwargs, **prompt_args)
        program = structured.program(self, output_cls, prompt)
        return program.stream_call(
            llm_kwargs=structured.program_kwargs(output_cls, llm_kwargs), **prompt_args
        )

    async def _structured_astream_call(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Any:
        if not self._constrains_output():
            return await super()._structured_astream_call(output_cls, prompt, llm_kwargs, **prompt_args)
        program = structured.program(self, output_cls, prompt)
        kwargs = structured.program_kwargs(output_cls, llm_kwargs)
        return await program.astream_call(llm_kwargs=kwargs, **prompt_args)


def _tool_spec(tool: BaseTool) -> dict[str, Any]:
    """A tool as OpenAI's tool spec. Its parameters get ``additionalProperties: false`` unless they say
    otherwise: the function takes only the parameters it declares, and under a forced ``tool_choice`` the
    grammar then keeps the model to them."""
    spec = tool.metadata.to_openai_tool(skip_length_check=True)
    spec["function"]["parameters"].setdefault("additionalProperties", False)
    return spec


class _Responses:
    """Accumulates a stream's text, provenance and tool calls into LlamaIndex responses."""

    def __init__(self, llm: ProxyAlign, call: adapters.EngineCall) -> None:
        self.llm, self.call = llm, call
        self.text = ""
        self.content = ""
        self.calls: dict[int, _PartialCall] = {}  # by the call's index in the reply
        self.token_ids: list[int] = []
        self.sources: list[Source] = []

    def completion(self, chunk: GenerationChunk) -> CompletionResponse:
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

    def chat(self, chunk: GenerationChunk) -> ChatResponse:
        """The reply so far: content outside calls (``delta`` is this step's), the calls released so far;
        the last one is the finished generation's reply."""
        response = self.completion(chunk)
        self.content += chunk.content or ""
        for piece in chunk.tool_calls:
            self.calls.setdefault(piece.index, _PartialCall()).add(piece)
        if chunk.generation is not None:
            message = assistant_message(chunk.generation.content or "", chunk.generation.tool_calls)
        else:
            message = assistant_message(self.content, [self.calls[i].call() for i in sorted(self.calls)])
        return ChatResponse(
            message=message,
            delta=chunk.content or "",
            raw=response.raw,
            additional_kwargs=response.additional_kwargs,
        )


@dataclass
class _PartialCall:
    """A streamed call put together from its pieces (OpenAI's streaming shape: the id and name once,
    argument fragments that concatenate)."""

    id: str = ""
    name: str = ""
    arguments: str = ""

    def add(self, piece: ToolCallDelta) -> None:
        self.id, self.name = piece.id or self.id, piece.name or self.name
        self.arguments += piece.arguments or ""

    def call(self) -> ToolCall:
        """The call so far (``parsed_arguments`` is ``{}`` until the arguments parse as an object)."""
        try:
            parsed = json.loads(self.arguments)
        except ValueError:
            parsed = {}
        return ToolCall(self.id, self.name, self.arguments, parsed if isinstance(parsed, dict) else {})

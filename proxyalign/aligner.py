"""``ProxyAligner``: the public face of the engine.

It owns the loaded models (p, q*, and optionally the small base q), their shared tokenizer, per-model
prompt formats and default generation settings. Every call is validated and tokenized here, at the edge,
and then submitted to the aligner's :class:`~proxyalign.engine.core.Engine`, which keeps one running
batch that requests from any number of threads and tasks join and leave between decoding steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypedDict, Unpack

from proxyalign.constrained import Grammar, GrammarCompiler
from proxyalign.criteria.base import Criterion
from proxyalign.engine.core import Channel, Engine, Ticket
from proxyalign.engine.gamma import GammaSchedule
from proxyalign.engine.request import Request, ToolParsing, derive_seed, roles_for
from proxyalign.engine.results import Generation, GenerationChunk
from proxyalign.engine.sampling import SamplingConfig
from proxyalign.engine.scheduler import SchedulerConfig
from proxyalign.errors import InvalidParameterError
from proxyalign.models import (
    LoadedModel,
    check_model_spec,
    check_same_vocabulary,
    context_window,
    eos_token_ids,
    load_model,
)
from proxyalign.plugins import get_criterion
from proxyalign.prompts import ROLES, Prompt, encode_prompts, is_messages, validate_format
from proxyalign.roles import ALIGNED, BASE, SMALL_BASE
from proxyalign.settings import DEFAULT_CRITERION, MODES, SSS_CRITERION, SSS_MODES, check_options
from proxyalign.tools import ToolCallParser, parser_for_tokenizer

__all__ = ["MODES", "GenerateOptions", "GenerationConfig", "ProxyAligner"]

logger = logging.getLogger(__name__)

PerRole = Any  # a value, or a mapping from role ("base", "aligned", "small_base") to values


class GenerateOptions(TypedDict, total=False):
    """Per-call options of ``generate`` / ``stream`` (all optional; None keeps the default)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    criterion: str | Criterion | None
    criterion_params: Mapping[str, Any] | None
    criterion_on: str
    mode: str
    gamma: int | str
    response_format: Any
    tools: Sequence[Mapping[str, Any]] | None
    tool_choice: str | Mapping[str, Any] | None
    parallel_tool_calls: bool | None


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults of a :class:`ProxyAligner`; every field can be overridden per call."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    criterion_on: str = "scaled"
    seed: int | None = None
    stop: tuple[str, ...] = ()
    mode: str = "token"
    gamma: int | str = 4  #: speculative modes: drafts per round, or "adaptive"

    def __post_init__(self) -> None:
        check_options(asdict(self))


_CONFIG_FIELDS = frozenset(GenerationConfig.__dataclass_fields__)


def _tool_options(options: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, str]:
    """A call's tools (normalised) and its tool choice: ``"auto"`` by default, ``"any"`` read as
    ``"required"``; a choice without tools, or naming a tool not given, is refused."""
    settings = check_options({k: options[k] for k in ("tools", "tool_choice") if k in options})
    tools, choice = settings.tools, settings.tool_choice or "auto"
    choice = "required" if choice == "any" else choice
    if not tools:
        if settings.tool_choice not in (None, "auto", "none"):
            raise InvalidParameterError(f"tool_choice={choice!r} needs tools=[...]")
        return None, "none"
    names = [t["function"]["name"] for t in tools]
    if choice not in ("auto", "none", "required") and choice not in names:
        raise InvalidParameterError(
            f"tool_choice names {choice!r}, which is not in tools; tools: {', '.join(names)}"
        )
    return tools, choice


def _per_role(value: PerRole, role: str, default: Any = None) -> Any:
    if isinstance(value, Mapping):
        unknown = set(value) - set(ROLES)
        if unknown:
            raise InvalidParameterError(
                f"unknown model role(s) {sorted(unknown)}; accepted: {', '.join(ROLES)}"
            )
        return value.get(role, default)
    return value if value is not None else default


class ProxyAligner:
    """Hybrid decoder of a large base model p and a small aligned model q*.

    >>> pa = ProxyAligner.from_pretrained(base="Qwen/Qwen2.5-7B", aligned="Qwen/Qwen2.5-0.5B-Instruct",
    ...                                   criterion="confidence_bet", criterion_params={"margin": 0.2})
    >>> pa.generate("Q: 2+2=? A:", max_new_tokens=8, seed=0)[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        base: Any,
        aligned: Any,
        tokenizer: Any,
        *,
        small_base: Any | None = None,
        criterion: str | Criterion = DEFAULT_CRITERION,
        criterion_params: Mapping[str, Any] | None = None,
        prompt_formats: Mapping[str, str] | None = None,
        generation_config: GenerationConfig | None = None,
        names: Mapping[str, str] | None = None,
        tokenizers: Mapping[str, Any] | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        """Wrap already loaded models (e.g. tiny ones built from a config in tests).

        ``tokenizers`` may give each model its own tokenizer object; they must share one vocabulary.
        ``scheduler`` sets the running batch's limits (rows, prefill chunk, cached tokens).
        """
        self.models: dict[str, Any] = {BASE: base, ALIGNED: aligned}
        if small_base is not None:
            self.models[SMALL_BASE] = small_base
        self.tokenizer = tokenizer
        per_model_tokenizers = {role: (tokenizers or {}).get(role, tokenizer) for role in self.models}
        self.vocab_size = check_same_vocabulary(per_model_tokenizers)
        for role, model in self.models.items():
            width = model.get_output_embeddings().weight.shape[0]
            if width < self.vocab_size:
                raise InvalidParameterError(
                    f"the {role} model predicts {width} ids but the tokenizer has {self.vocab_size}"
                )
        self.eos_token_ids = eos_token_ids(self.models, per_model_tokenizers)
        self.pad_token_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else min(self.eos_token_ids, default=0)
        )
        formats = dict(prompt_formats or {})
        self.prompt_formats = {role: validate_format(role, formats.get(role, "auto")) for role in ROLES}
        self.names = {
            role: (names or {}).get(role, type(model).__name__) for role, model in self.models.items()
        }
        self.defaults = generation_config or GenerationConfig()
        #: Reads tool calls in the aligned model's template family (the model that knows tools).
        self.tool_parser: ToolCallParser = parser_for_tokenizer(per_model_tokenizers[ALIGNED])
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        self.criterion = get_criterion(criterion, **dict(criterion_params or {}))
        self._check_criterion(self.criterion)
        self.engine = Engine(
            self.models,
            tokenizer,
            vocab_size=self.vocab_size,
            eos_ids=self.eos_token_ids,
            pad_id=self.pad_token_id,
            windows={role: context_window(model) for role, model in self.models.items()},
            config=scheduler,
        )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str],
        aligned: str | os.PathLike[str],
        *,
        small_base: str | os.PathLike[str] | None = None,
        criterion: str | Criterion = DEFAULT_CRITERION,
        criterion_params: Mapping[str, Any] | None = None,
        dtype: PerRole = "auto",
        device: PerRole = None,
        device_map: PerRole = None,
        trust_remote_code: bool = False,
        prompt_formats: Mapping[str, str] | None = None,
        generation_config: GenerationConfig | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> ProxyAligner:
        """Load p, q* (and q) from hub ids, local directories, ``.gguf`` files or offline assets.

        ``dtype``, ``device`` and ``device_map`` take one value for all models or a mapping per role,
        e.g. ``device={"base": "cuda:0", "aligned": "cuda:1"}``.
        """
        # Validate the criterion before spending a minute loading weights.
        chosen = get_criterion(criterion, **dict(criterion_params or {}))
        if chosen.needs_small_base and small_base is None:
            raise InvalidParameterError(
                f"criterion {chosen.name!r} needs the small base model q: pass small_base=..."
            )
        specs = {BASE: base, ALIGNED: aligned}
        if small_base is not None:
            specs[SMALL_BASE] = small_base
        for role, spec in specs.items():  # every model's paths and options, before any weights load
            check_model_spec(
                spec, role=role, dtype=_per_role(dtype, role, "auto"), device=_per_role(device, role)
            )
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise InvalidParameterError("generation_config must be a proxyalign.GenerationConfig")
        for role in prompt_formats or {}:
            validate_format(role, (prompt_formats or {})[role])
        loaded: dict[str, LoadedModel] = {}
        for role, spec in specs.items():
            loaded[role] = load_model(
                spec,
                role=role,
                dtype=_per_role(dtype, role, "auto"),
                device=_per_role(device, role),
                device_map=_per_role(device_map, role),
                trust_remote_code=trust_remote_code,
            )
        return cls(
            loaded[BASE].model,
            loaded[ALIGNED].model,
            loaded[ALIGNED].tokenizer,
            small_base=loaded[SMALL_BASE].model if SMALL_BASE in loaded else None,
            criterion=chosen,
            prompt_formats=prompt_formats,
            generation_config=generation_config,
            names={role: item.name for role, item in loaded.items()},
            tokenizers={role: item.tokenizer for role, item in loaded.items()},
            scheduler=scheduler,
        )

    # -- settings ------------------------------------------------------------------------------
    def _check_criterion(self, criterion: Criterion) -> None:
        if criterion.needs_small_base and SMALL_BASE not in self.models:
            raise InvalidParameterError(
                f"criterion {criterion.name!r} needs the small base model q, but this ProxyAligner "
                "has none: load it with small_base=..."
            )

    def resolve_criterion(
        self,
        criterion: str | Criterion | None = None,
        criterion_params: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> Criterion:
        """The criterion of a call: the instance default unless a name/params are given.

        A call in an SSS mode (``mode``, else the instance's) that names no criterion gets
        ``implicit_reward``: those modes sample its target, so naming it as well would be redundant.
        """
        sss = (mode or self.defaults.mode) in SSS_MODES
        if criterion is None and sss and self.criterion.name != SSS_CRITERION:
            criterion = SSS_CRITERION
        if criterion is None and not criterion_params:
            return self.criterion
        if criterion is None:
            chosen = get_criterion(self.criterion.name, **{**self.criterion.params, **criterion_params})
        else:
            chosen = get_criterion(criterion, **dict(criterion_params or {}))
        self._check_criterion(chosen)
        return chosen

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[Generation]:
        """Complete a prompt or a batch of prompts; one :class:`Generation` per prompt, in order.

        ``options`` override the instance defaults for this call: ``max_new_tokens``, ``temperature``
        (0 = greedy), ``top_k``, ``top_p``, ``seed``, ``stop``, ``criterion``, ``criterion_params``,
        ``criterion_on``, ``mode`` and ``gamma`` (see :data:`MODES`). Per call only:
        ``response_format`` (OpenAI's shapes, e.g. ``{"type": "json_object"}``, plus ``{"type": "regex",
        "pattern": ...}``: every model's distribution is restricted to what keeps the output valid),
        ``tools`` (OpenAI tools, offered through each model's template; calls are parsed into
        ``Generation.tool_calls``) and ``tool_choice`` (``"auto"``, ``"none"``, ``"required"`` or a
        tool's name: the last two constrain the output to calls; ``parallel_tool_calls=False``: to one
        call). Safe to call from many threads at
        once: every call's prompts join the engine's one running batch. With a ``seed``, prompt ``i``
        samples from its own generator (:func:`~proxyalign.engine.request.derive_seed`), so its tokens
        do not depend on what else is decoding.
        """
        requests = self.requests(self._as_batch(prompts), **options)
        channel = Channel()
        tickets = self._submit(requests, channel)
        results: list[Generation | None] = [None] * len(requests)
        left = len(requests)
        try:
            while left:
                index, item = channel.get()
                if isinstance(item, BaseException):
                    raise item
                if item.generation is not None:
                    results[index] = item.generation
                    left -= 1
        finally:
            self.engine.abort(tickets)
        return [r for r in results if r is not None]

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Iterator[GenerationChunk]:
        """Stream one prompt's completion; the last chunk carries the whole :class:`Generation`.

        Options are checked at once; decoding starts at the first ``next()``. Closing the iterator (or
        dropping it) aborts the request within one step.
        """
        if self._looks_like_batch(prompt):
            raise InvalidParameterError("stream() takes one prompt; use stream_batch() for several")
        return self._stream(self.requests([prompt], **options))

    def stream_batch(
        self, prompts: Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> Iterator[GenerationChunk]:
        """Stream several prompts decoded side by side; chunks say which prompt by ``index``."""
        return self._stream(self.requests(self._as_batch(prompts), **options))

    async def agenerate(
        self, prompts: Prompt | Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[Generation]:
        """:meth:`generate` for asyncio: never blocks the event loop; cancelling it aborts its rows."""
        requests = self.requests(self._as_batch(prompts), **options)
        results: list[Generation | None] = [None] * len(requests)
        async for chunk in self._astream(requests):
            if chunk.generation is not None:
                results[chunk.index] = chunk.generation
        return [r for r in results if r is not None]

    def astream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncIterator[GenerationChunk]:
        """:meth:`stream` for asyncio (``async for chunk in pa.astream(...)``); closing or cancelling the
        iteration aborts the request within one step."""
        if self._looks_like_batch(prompt):
            raise InvalidParameterError("astream() takes one prompt; use astream_batch() for several")
        return self._astream(self.requests([prompt], **options))

    def astream_batch(
        self, prompts: Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[GenerationChunk]:
        """:meth:`stream_batch` for asyncio."""
        return self._astream(self.requests(self._as_batch(prompts), **options))

    def astream_requests(self, requests: Sequence[Request]) -> AsyncIterator[GenerationChunk]:
        """Stream requests already built by :meth:`requests` (validated and tokenized), e.g. by a server
        that inspected them first (prompt lengths, cache needs) and should not tokenize twice. Chunks
        carry each request's ``index``; closing or cancelling the iteration aborts them."""
        return self._astream(list(requests))

    def as_completed(
        self, calls: Iterable[tuple[Prompt, Mapping[str, Any]]], *, in_flight: int = 8
    ) -> Iterator[tuple[int, Generation]]:
        """Decode many ``(prompt, options)`` calls, ``in_flight`` at a time: as each finishes, the next one
        joins the running batch, so the batch stays full (an evaluation's long and short answers do not
        leave rows idle). Yields ``(position, Generation)`` in order of completion. A call's options are
        checked when it is submitted; an error stops the iteration. Closing the iterator aborts the
        calls still decoding.
        """
        if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
            raise InvalidParameterError(f"in_flight must be an integer >= 1, got {in_flight!r}")
        return self._as_completed(iter(enumerate(calls)), in_flight)

    def _as_completed(
        self, calls: Iterator[tuple[int, tuple[Prompt, Mapping[str, Any]]]], in_flight: int
    ) -> Iterator[tuple[int, Generation]]:
        channel = Channel()
        running: dict[int, Ticket] = {}

        def submit_next() -> bool:
            item = next(calls, None)
            if item is None:
                return False
            position, (prompt, options) = item
            (request,) = self.requests([prompt], **options)
            (running[position],) = self._submit([replace(request, index=position)], channel)
            return True

        try:
            while len(running) < in_flight and submit_next():
                pass
            while running:
                position, item = channel.get()
                if isinstance(item, BaseException):
                    raise item
                if item.generation is not None:
                    del running[position]
                    submit_next()
                    yield position, item.generation
        finally:
            self.engine.abort(list(running.values()))

    def status(self) -> dict[str, Any]:
        """The engine's state: ``{"running": n, "waiting": m, "decoding": ..., "prefilling": ...,
        "lanes": {...}, "reserved_tokens": ..., "totals": {...}}`` (for monitoring and metrics)."""
        return self.engine.status()

    def calibrate_auto(self, max_rows: int = 8) -> float:
        """Measure this host's forward costs for ``mode="auto"`` up to ``max_rows`` rows now, before any
        request (otherwise the first auto calls wait for them once per batch size they reach); returns
        the seconds it took. Call it before decoding starts: see ``Engine.calibrate_auto``."""
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise InvalidParameterError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        spent = self.engine.calibrate_auto(max_rows)
        logger.info("measured the forward costs of mode auto up to %d rows in %.1f s", max_rows, spent)
        return spent

    def close(self) -> None:
        """Abort every request and stop the engine thread; the aligner refuses new calls afterwards."""
        self.engine.close()

    def requests(self, prompts: Sequence[Prompt], **options: Unpack[GenerateOptions]) -> list[Request]:
        """Validate options and prompts and build one engine :class:`Request` per prompt.

        Everything is checked here, before any model runs: a bad value raises
        :class:`~proxyalign.InvalidParameterError` naming the parameter.
        """
        config, sampling, chosen = self._checked(options)
        tools, choice = _tool_options(options)
        parallel = options.get("parallel_tool_calls") is not False
        grammar = self._grammar(options.get("response_format"), tools, choice, parallel)
        offered = tools if choice != "none" else None
        roles = list(roles_for(chosen))
        encoded = self._tokenize(prompts, roles, config.max_new_tokens, offered)
        names = frozenset(t["function"]["name"] for t in offered) if offered else None
        seeds = [None if config.seed is None else derive_seed(config.seed, i) for i in range(len(prompts))]
        return [
            Request(
                prompt_ids={role: tuple(encoded[role][i]) for role in roles},
                criterion=chosen,
                sampling=sampling,
                max_new_tokens=config.max_new_tokens,
                stop=config.stop,
                mode=config.mode,
                gamma=config.gamma,
                seed=seeds[i],
                index=i,
                grammar=grammar,
                tools=ToolParsing(self.tool_parser, names, seeds[i]) if offered else None,
            )
            for i in range(len(prompts))
        ]

    def _grammar(
        self, response_format: Any, tools: list[dict[str, Any]] | None, choice: str, parallel: bool
    ) -> Grammar | None:
        """The call's output grammar, compiled and checked here (the first one builds llguidance's
        tokenizer, about a second for a 150k vocabulary)."""
        return self.grammars.output_grammar(
            response_format, tools, choice, self.tool_parser.call_grammar, parallel
        )

    def check_options(self, **options: Unpack[GenerateOptions]) -> None:
        """Validate generation options as a call would, without decoding anything (the adapters check
        their settings with this at construction)."""
        self._checked(options)

    # -- internals -----------------------------------------------------------------------------
    def _checked(self, options: Mapping[str, Any]) -> tuple[GenerationConfig, SamplingConfig, Criterion]:
        """A call's merged settings and its criterion, every value validated."""
        config, sampling = self._settings(options)
        chosen = self.resolve_criterion(
            options.get("criterion"), options.get("criterion_params"), config.mode
        )
        if config.mode in SSS_MODES and chosen.name != SSS_CRITERION:
            raise InvalidParameterError(
                f"mode {config.mode!r} samples SSS's target p*q*/q, which is the 'implicit_reward' "
                f"criterion; this call uses {chosen.name!r}: pass criterion='implicit_reward' "
                "(it needs the small base model, small_base=...)"
            )
        GammaSchedule.parse(config.gamma)
        return config, sampling, chosen

    def _submit(self, requests: list[Request], channel: Channel) -> list[Ticket]:
        if self.engine.in_engine_thread:
            raise RuntimeError(
                "generate()/stream() was called from inside the engine (e.g. from a criterion); "
                "criteria must be pure functions of distributions"
            )
        return self.engine.submit(requests, channel)

    def _stream(self, requests: list[Request]) -> Iterator[GenerationChunk]:
        channel = Channel()
        tickets = self._submit(requests, channel)
        left = len(requests)
        try:
            while left:
                _, item = channel.get()
                if isinstance(item, BaseException):
                    raise item
                left -= item.generation is not None
                yield item
        finally:
            self.engine.abort(tickets)

    async def _astream(self, requests: list[Request]) -> AsyncIterator[GenerationChunk]:
        channel = Channel(asyncio.get_running_loop())
        tickets = self._submit(requests, channel)
        left = len(requests)
        try:
            while left:
                _, item = await channel.aget()
                if isinstance(item, BaseException):
                    raise item
                left -= item.generation is not None
                yield item
        finally:
            self.engine.abort(tickets)

    @staticmethod
    def _looks_like_batch(prompts: Any) -> bool:
        return (
            isinstance(prompts, Sequence)
            and not isinstance(prompts, str | bytes | bytearray)
            and not is_messages(prompts)
        )

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        batch = list(prompts) if self._looks_like_batch(prompts) else [prompts]
        if not batch:
            raise InvalidParameterError("prompts is empty; give at least one prompt")
        return batch

    def _settings(self, options: Mapping[str, Any]) -> tuple[GenerationConfig, SamplingConfig]:
        """Validate per-call options (:func:`proxyalign.settings.check_options`) and merge them into the
        instance defaults, before any work."""
        given = check_options(options).given()
        config = replace(self.defaults, **{k: v for k, v in given.items() if k in _CONFIG_FIELDS})
        sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.criterion_on)
        return config, sampling

    def _tokenize(
        self,
        batch: Sequence[Prompt],
        roles: Sequence[str],
        max_new_tokens: int,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, list[list[int]]]:
        windows = {role: context_window(self.models[role]) for role in roles}
        return encode_prompts(batch, self.prompt_formats, self.tokenizer, windows, max_new_tokens, tools)

    def __repr__(self) -> str:
        models = ", ".join(f"{role}={name!r}" for role, name in self.names.items())
        return f"ProxyAligner({models}, criterion={self.criterion!r})"

"""Framework-neutral glue for ecosystem adapters (LangChain, LlamaIndex, ...) over :class:`ProxyAligner`.

Nothing here decodes: every token comes from the engine. This module turns an adapter's settings and
call kwargs into engine arguments, shares loaded models between adapters in one process, and folds
the engine's streams into chunks that carry text. It knows no framework: the integration packages
import it. Sync and async calls alike go straight to the engine's running batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import threading
import typing
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from proxyalign import Criterion, Generation, GenerationChunk, ProxyAligner, Source
from proxyalign.models import context_window

__all__ = [
    "SETTING_FIELDS",
    "EngineCall",
    "acoalesce",
    "adapter_aligner",
    "chat_prompt",
    "check_settings",
    "coalesce",
    "completion_info",
    "default_criterion",
    "effective_settings",
    "engine_call",
    "engine_parameters",
    "instance_settings",
    "merge_criterion",
    "min_context_window",
    "model_name",
    "provenance",
    "shared_aligner",
    "summary",
    "token_ids",
    "usage",
]

#: Common names for engine arguments (OpenAI/LangChain ``max_tokens``).
ALIASES = {"max_tokens": "max_new_tokens"}
#: Call kwargs of features the hybrid does not offer: fail loudly rather than silently ignore them.
#: OpenAI's legacy function-calling arguments (``tools``/``tool_choice`` replaced them, and are forwarded).
UNSUPPORTED_CALL_KWARGS = frozenset({"functions", "function_call"})
#: Engine settings every adapter declares as a field of its own, in engine names (LangChain's field for
#: ``max_new_tokens`` is ``max_tokens``). ``engine_kwargs`` carries any other ``generate`` option.
SETTING_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "criterion_on",
    "criterion",
    "criterion_params",
)

_SHARED: weakref.WeakValueDictionary[str, ProxyAligner] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def default_criterion() -> Any:
    """The criterion ``ProxyAligner.from_pretrained`` uses when given none."""
    return inspect.signature(ProxyAligner.from_pretrained).parameters["criterion"].default


def shared_aligner(
    base: str, aligned: str, small_base: str | None, criterion: Any, load_kwargs: Mapping[str, Any]
) -> ProxyAligner:
    """Load a model pair once per process: adapters built from the same ids share one ProxyAligner.

    The key leaves out the criterion on purpose: adapters pass their criterion on every call, so one
    pair of loaded models serves any number of criteria. Entries go when no adapter uses them.
    """
    key = json.dumps([base, aligned, small_base, dict(load_kwargs)], sort_keys=True, default=repr)
    with _SHARED_LOCK:
        aligner = _SHARED.get(key)
        if aligner is None:
            aligner = ProxyAligner.from_pretrained(
                base, aligned, small_base=small_base, criterion=criterion, **dict(load_kwargs)
            )
            _SHARED[key] = aligner
    return aligner


def adapter_aligner(
    aligner: Any,
    base: str | None,
    aligned: str | None,
    small_base: str | None,
    criterion: Any,
    load_kwargs: Mapping[str, Any],
) -> tuple[ProxyAligner, Any]:
    """The engine an adapter decodes with, and the adapter's criterion.

    A given ``aligner`` is used as it is. Otherwise ``base`` and ``aligned`` load (or reuse) a pair, and
    a criterion left unset becomes the default the pair is loaded with, so the adapter reports it.
    """
    if aligner is None:
        if not (base and aligned):
            raise ValueError("give either aligner=ProxyAligner(...) or both base=... and aligned=...")
        if criterion is None:
            criterion = default_criterion()
        return shared_aligner(base, aligned, small_base, criterion, load_kwargs), criterion
    if not isinstance(aligner, ProxyAligner):
        raise TypeError(f"aligner must be a proxyalign.ProxyAligner, got {type(aligner).__name__}")
    return aligner, criterion


def instance_settings(adapter: Any, *, renamed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An adapter's settings in engine names, ``None`` where unset: the input of :func:`engine_call`.

    Read from the adapter's attributes (:data:`SETTING_FIELDS` and ``engine_kwargs``); ``renamed`` maps
    an engine name to the adapter's field where the framework spells it differently.
    """
    field = dict(renamed or {})
    own = {name: getattr(adapter, field.get(name, name)) for name in SETTING_FIELDS}
    criterion = {name: own.pop(name) for name in ("criterion", "criterion_params")}
    return {**own, **adapter.engine_kwargs, **criterion}


def check_settings(
    aligner: ProxyAligner,
    settings: Mapping[str, Any],
    engine_kwargs: Collection[str],
    *,
    list_accepted: bool = True,
) -> None:
    """Refuse an adapter's bad settings when it is built, not at its first call.

    ``engine_kwargs`` may only name ``generate`` options without a field of their own (a second spelling
    of a field would make the two disagree); every value must pass ``ProxyAligner.check_options``.
    ``list_accepted`` adds the accepted names to the message.
    """
    accepted = engine_parameters(aligner) - set(SETTING_FIELDS)
    unknown = set(engine_kwargs) - accepted
    if unknown:
        message = f"engine_kwargs {sorted(unknown)} are not ProxyAligner.generate options"
        if list_accepted:
            message += f" without a field of their own; accepted: {sorted(accepted)}"
        raise ValueError(message)
    aligner.check_options(**{k: v for k, v in settings.items() if v is not None})


@functools.cache
def _generate_options(engine: type) -> frozenset[str]:
    names: set[str] = set()
    for name, parameter in inspect.signature(engine.generate).parameters.items():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            names.add(name)
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:  # **options: Unpack[SomeTypedDict]
            hint = typing.get_type_hints(engine.generate).get(name)
            if typing.get_origin(hint) is typing.Unpack:
                (options,) = typing.get_args(hint)
                names.update(typing.get_type_hints(options))
    return frozenset(names)


def engine_parameters(aligner: ProxyAligner) -> frozenset[str]:
    """Keyword arguments the engine's ``generate`` accepts.

    Read from its signature (keyword-only parameters, or the TypedDict of ``**options``) so that engine
    options added later (decoding ``mode``, ``gamma``, ...) are forwarded without touching the adapters.
    """
    return _generate_options(type(aligner))


def model_name(aligner: ProxyAligner) -> str:
    """Both models, base first: what usage trackers and traces show."""
    return f"{aligner.names['base']}+{aligner.names['aligned']}"


def token_ids(aligner: ProxyAligner, text: str) -> list[int]:
    """Token ids of ``text`` by the models' own tokenizer, without special tokens: what the frameworks'
    token counters should count (their defaults guess with another tokenizer)."""
    return list(aligner.tokenizer.encode(text, add_special_tokens=False))


def min_context_window(aligner: ProxyAligner) -> int | None:
    """Tokens the hybrid can attend to: the smallest window of its models."""
    windows = [w for w in (context_window(m) for m in aligner.models.values()) if w]
    return min(windows) if windows else None


def chat_prompt(aligner: ProxyAligner, messages: list[dict[str, str]], as_text: Callable[[], str]) -> Any:
    """The engine prompt of a chat: the messages for models that take a chat template (rendered with the
    aligned model's), and ``as_text()`` for models whose prompt format is ``"plain"`` (the papers'
    setting gives the base model plain text)."""
    plain = {role for role in aligner.models if aligner.prompt_formats.get(role) == "plain"}
    if not plain:
        return messages
    text = as_text()
    if len(plain) == len(aligner.models):
        return text
    return {role: text if role in plain else messages for role in aligner.models}


def effective_settings(aligner: ProxyAligner, instance: Mapping[str, Any]) -> dict[str, Any]:
    """Every generation setting as the engine will use it: the adapter's value, else the aligner's."""
    settings = dataclasses.asdict(aligner.defaults)
    settings.update({k: v for k, v in instance.items() if v is not None})
    settings["stop"] = (
        [settings["stop"]] if isinstance(settings["stop"], str) else list(settings["stop"] or ())
    )
    return settings


@dataclass(frozen=True)
class EngineCall:
    """The engine arguments of one call, plus the criterion they resolve to (for metadata)."""

    kwargs: dict[str, Any]
    criterion: Criterion

    @property
    def key(self) -> str:
        """A stable text form, to recognise calls with identical settings."""
        return json.dumps(self.kwargs, sort_keys=True, default=repr)


def merge_criterion(
    instance_name: Any,
    instance_params: Mapping[str, Any] | None,
    call_name: Any,
    call_params: Mapping[str, Any] | None,
) -> tuple[Any, dict[str, Any] | None]:
    """Per-call criterion settings on top of the instance's.

    Parameters given alone refine the instance's criterion; naming another criterion starts from that
    criterion's own defaults (the instance's parameters belong to a different rule).
    """
    if call_name is not None and call_name != instance_name:
        return call_name, dict(call_params) if call_params else None
    merged = {**(instance_params or {}), **(call_params or {})}
    return instance_name, merged or None


def engine_call(
    aligner: ProxyAligner,
    instance: Mapping[str, Any],
    call: Mapping[str, Any],
    *,
    owner: str,
    ignored: Collection[str] = (),
) -> EngineCall:
    """An adapter's settings (engine names) overridden by one call's kwargs, as ``generate`` arguments.

    Unknown kwargs raise instead of being dropped: a misspelt setting must not silently do nothing.
    """
    accepted = engine_parameters(aligner)
    given: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # engine name -> how the caller spelled it
    for key, value in call.items():
        if key in ignored:
            continue
        if key in UNSUPPORTED_CALL_KWARGS:
            raise NotImplementedError(
                f"{owner} does not support OpenAI's legacy {key!r} argument; pass tools=[...] and "
                "tool_choice=... instead"
            )
        if key == "model":
            raise ValueError(
                f"{owner} cannot switch models per call (got model={value!r}); "
                "build another instance, sharing weights with aligner=..."
            )
        name = ALIASES.get(key, key)
        if name not in accepted:
            known = ", ".join(sorted(accepted | set(ALIASES)))
            raise TypeError(f"{owner} got an unknown argument {key!r}; accepted: {known}")
        if name in given and given[name] != value:
            raise ValueError(f"{spelled[name]!r} and {key!r} are the same setting; give one of them")
        given[name] = value
        spelled[name] = key
    settings = {k: v for k, v in instance.items() if v is not None}
    criterion, params = merge_criterion(
        settings.pop("criterion", None),
        settings.pop("criterion_params", None),
        given.pop("criterion", None),
        given.pop("criterion_params", None),
    )
    kwargs = {**settings, **{k: v for k, v in given.items() if v is not None}}
    if criterion is not None:
        kwargs["criterion"] = criterion
    if params:
        kwargs["criterion_params"] = params
    return EngineCall(kwargs, aligner.resolve_criterion(criterion, params, kwargs.get("mode")))


def usage(generations: Sequence[Generation]) -> dict[str, int]:
    """OpenAI-style token counts: the names LangChain and LlamaIndex token counters read."""
    prompt = sum(g.stats.prompt_tokens for g in generations)
    completion = sum(g.stats.new_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def provenance(token_ids: Sequence[int], sources: Sequence[Source]) -> dict[str, list[Any]]:
    """Which model supplied each token (lists concatenate when streamed chunks are merged)."""
    return {"token_ids": list(token_ids), "token_sources": [str(s) for s in sources]}


def summary(generation: Generation, name: str, criterion: Criterion) -> dict[str, Any]:
    """Per-completion metadata other than provenance: given once per completion, also when streaming."""
    return {
        "model_name": name,
        "finish_reason": str(generation.finish_reason),
        "stop_sequence": generation.stop_sequence,
        "criterion": criterion.name,
        "criterion_params": dict(criterion.params),
        "proxyalign_stats": generation.stats.as_dict(),
    }


def completion_info(generation: Generation, name: str, criterion: Criterion) -> dict[str, Any]:
    """Everything a finished completion reports: :func:`summary`, then :func:`provenance`."""
    return {
        **summary(generation, name, criterion),
        **provenance(generation.token_ids, generation.sources),
    }


def coalesce(chunks: Iterator[GenerationChunk]) -> Iterator[GenerationChunk]:
    """Fold steps that released no text into the next chunk of the same row.

    The engine holds text back while it might still begin a stop string (and some tokens decode to
    nothing); callbacks should not see empty tokens, but no token's provenance may be lost. Every
    chunk yielded has text or ends its row. Closing this generator closes the engine's stream (which
    aborts the request).
    """
    folder = _Folder()
    with closing(chunks):  # type: ignore[type-var]
        for chunk in chunks:
            if (out := folder.fold(chunk)) is not None:
                yield out


async def acoalesce(chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    """:func:`coalesce` for the engine's async streams (``ProxyAligner.astream``)."""
    folder = _Folder()
    try:
        async for chunk in chunks:
            if (out := folder.fold(chunk)) is not None:
                yield out
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


class _Folder:
    def __init__(self) -> None:
        self.pending: dict[int, tuple[list[int], list[Source]]] = {}

    def fold(self, chunk: GenerationChunk) -> GenerationChunk | None:
        token_ids, sources = self.pending.pop(chunk.index, ([], []))
        token_ids, sources = token_ids + chunk.token_ids, sources + chunk.sources
        if not chunk.text and not chunk.tool_calls and chunk.generation is None:
            self.pending[chunk.index] = (token_ids, sources)
            return None
        return dataclasses.replace(chunk, token_ids=token_ids, sources=sources)

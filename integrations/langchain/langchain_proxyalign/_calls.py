"""Per-call arguments of chains written for OpenAI's chat models: what the hybrid honours, what it cannot.

A chain written for ``ChatOpenAI`` passes OpenAI's arguments (``n``, ``logprobs``, ``presence_penalty``,
``parallel_tool_calls``, ...). Those with an engine equivalent pass on; a neutral value of one the hybrid
lacks (``n=1``, ``presence_penalty=0``) is dropped, since it asks for nothing; any other value raises
:class:`~proxyalign.InvalidParameterError` naming the argument, so no call silently answers differently
from what it asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from proxyalign.errors import InvalidParameterError

from langchain_proxyalign._structured import closed

__all__ = [
    "FORMAT_ARGUMENTS",
    "TOOL_CHOICES",
    "CallArguments",
    "check_timeout",
    "engine_response_format",
    "openai_tools",
    "split_call_arguments",
    "tool_choice_option",
]

#: Engine options the chat model hands on itself: what tools to offer and how to shape the output.
FORMAT_ARGUMENTS = ("tools", "tool_choice", "response_format")
#: OpenAI's newer spelling of ``max_tokens``.
_RENAMED = {"max_completion_tokens": "max_tokens"}
#: Call kwargs sorted out here rather than passed on as settings (``stream_options`` is accepted and
#: ignored: usage is reported on every call, streamed or not).
_HANDLED = frozenset({*FORMAT_ARGUMENTS, "timeout", "parallel_tool_calls", "stream_options"})

_SERVICE = "an OpenAI service option, with no meaning for a local model"
_LOGPROBS = (
    "token log-probabilities are not reported (each token comes from one of two models; "
    "response_metadata['token_sources'] says which)"
)
_PENALTY = "the hybrid applies no repetition penalties"
#: OpenAI arguments the hybrid cannot honour: the values that ask for nothing, and why any other fails.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "one completion per call: batch() the prompt with different seeds for several"),
    "logprobs": ((None, False), _LOGPROBS),
    "top_logprobs": ((None, 0), _LOGPROBS),
    "presence_penalty": ((None, 0), _PENALTY),
    "frequency_penalty": ((None, 0), _PENALTY),
    "logit_bias": ((None, {}), "no per-token biases: constrain the output with response_format instead"),
    "functions": ((None,), "the legacy functions API: use bind_tools()"),
    "function_call": ((None,), "the legacy functions API: use bind_tools(tool_choice=...)"),
    **{
        name: ((None,), _SERVICE)
        for name in (
            "user",
            "metadata",
            "store",
            "service_tier",
            "reasoning_effort",
            "modalities",
            "audio",
            "prediction",
            "web_search_options",
            "verbosity",
            "safety_identifier",
            "prompt_cache_key",
            "extra_body",
            "extra_headers",
            "extra_query",
        )
    },
}


@dataclass(frozen=True)
class CallArguments:
    """One call's kwargs sorted out: settings for :func:`proxyalign.adapters.engine_call`, the tool and
    format options (already in the engine's shapes), and the call's own ``timeout`` (None: unset)."""

    settings: dict[str, Any]
    formats: dict[str, Any]
    timeout: float | None


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """A timeout in seconds (a positive number) or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or math.isinf(value):
        raise InvalidParameterError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def split_call_arguments(kwargs: Mapping[str, Any], owner: str) -> CallArguments:
    """Sort a call's kwargs (see the module docstring); refuses what the hybrid cannot honour."""
    settings: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in UNSUPPORTED:
            _check_neutral(key, value, owner)
        elif key not in _HANDLED:
            settings[_renamed(key, kwargs)] = value
    formats = {key: kwargs[key] for key in FORMAT_ARGUMENTS if kwargs.get(key) is not None}
    if "tools" in formats:
        formats["tools"] = openai_tools(formats["tools"])
    if "response_format" in formats:
        formats["response_format"] = engine_response_format(formats["response_format"])
    _check_parallel_calls(kwargs.get("parallel_tool_calls"), formats.get("tool_choice"), owner)
    return CallArguments(settings, formats, check_timeout(kwargs.get("timeout")))


def openai_tools(tools: Sequence[Any], strict: bool | None = None) -> list[dict[str, Any]]:
    """LangChain tools, functions, pydantic classes or OpenAI dicts as OpenAI tools (``strict``:
    LangChain's OpenAI strict mode, for those not in OpenAI's shape already)."""
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidParameterError(f"tools must be a list of tools, got {type(tools).__name__}")
    return [convert_to_openai_tool(tool, strict=strict) for tool in tools]


def _check_neutral(key: str, value: Any, owner: str) -> None:
    neutral, why = UNSUPPORTED[key]
    if value not in neutral:  # == comparison: n=1, presence_penalty=0.0 and logit_bias={} ask for nothing
        raise InvalidParameterError(f"{owner} does not support {key}={value!r}: {why}")


def _renamed(key: str, kwargs: Mapping[str, Any]) -> str:
    new = _RENAMED.get(key)
    if new is None:
        return key
    if kwargs.get(new) is not None:
        raise InvalidParameterError(f"{key!r} and {new!r} are the same setting; give one of them")
    return new


def _check_parallel_calls(value: Any, tool_choice: Any, owner: str) -> None:
    """``parallel_tool_calls=False`` holds only where the grammar allows one call: a named tool choice."""
    if value in (None, True):
        return
    if value is not False:
        raise InvalidParameterError(f"parallel_tool_calls must be True, False or None, got {value!r}")
    if not _names_one_tool(tool_choice):
        raise InvalidParameterError(
            f"{owner} does not support parallel_tool_calls=False with tool_choice={tool_choice!r}: the "
            "model may write several calls in one turn. Name one tool in tool_choice (then exactly one "
            "call is written), or read only the first of AIMessage.tool_calls"
        )


def _names_one_tool(tool_choice: Any) -> bool:
    if isinstance(tool_choice, Mapping):
        return True
    return isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required", "any")


#: ``tool_choice`` words besides a tool's name ("any" is LangChain's word for OpenAI's "required").
TOOL_CHOICES = ("auto", "none", "any", "required")


def tool_choice_option(choice: Any, names: Sequence[str]) -> str | None:
    """A ``bind_tools`` choice in the engine's terms: None (the engine's "auto"), a word, or a bound
    tool's name. ``True`` means the only tool, ``False`` no forcing; a dict names its tool."""
    if choice is None or choice is False:
        return None
    if choice is True:
        if len(names) != 1:
            raise InvalidParameterError(
                f"tool_choice=True means the single bound tool, but {len(names)} are bound "
                f"({', '.join(names) or 'none'}); name one, or use 'any'"
            )
        return names[0]
    name = choice
    if isinstance(choice, Mapping):  # OpenAI's {"type": "function", "function": {"name"}}, or {"name"}
        function = choice.get("function", choice)
        name = function.get("name") if isinstance(function, Mapping) else None
    elif isinstance(choice, str) and choice in TOOL_CHOICES:
        return "required" if choice == "any" else choice
    if isinstance(name, str) and name in names:
        return name
    raise InvalidParameterError(
        f"tool_choice must be one of {', '.join(TOOL_CHOICES)}, True (the single tool), a bound tool's name "
        f'or {{"type": "function", "function": {{"name": ...}}}}; got {choice!r} '
        f"(bound tools: {', '.join(names) or 'none'})"
    )


def engine_response_format(value: Any) -> Any:
    """A ``response_format`` for the engine: a class (pydantic, v1 or v2, or TypedDict) becomes OpenAI's
    json_schema shape, its objects closed as ``with_structured_output`` has them; anything else is the
    engine's to check."""
    if not isinstance(value, type):
        return value
    try:
        name = convert_to_openai_tool(value)["function"]["name"]
        schema = convert_to_json_schema(value)
    except (ValueError, TypeError) as exc:
        raise InvalidParameterError(
            f"response_format {value!r} is a class but not a pydantic model or TypedDict ({exc})"
        ) from None
    return {"type": "json_schema", "json_schema": {"name": name, "schema": closed(schema)}}

"""OpenAI request → proxyalign call: prompts, options and what to send back.

The hybrid honours ``temperature``, ``top_p``, ``max_tokens``/``max_completion_tokens``, ``stop``,
``seed``, ``n``, ``user`` (only logged), ``response_format`` and, in chat, ``tools``, ``tool_choice``,
``parallel_tool_calls`` and tool turns; proxyalign's own options come as extensions. A parameter it
cannot honour (``logprobs``, penalties ...) is refused with a 400 naming it, unless its value is the one
that changes nothing (``presence_penalty: 0``, ``logprobs: false``; clients often send those) or the
server was started with ``--ignore-unsupported``. Everything else is checked by proxyalign's own
validation (:func:`proxyalign.settings.check_options`, the tools and grammar checks), so the server and
the Python API agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxyalign.prompts import Prompt
from proxyalign.roles import ROLES
from proxyalign.server.config import ServerConfig
from proxyalign.server.errors import APIError
from proxyalign.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
)

__all__ = ["NEUTRAL_VALUES", "Plan", "plan_chat", "plan_completion"]

logger = logging.getLogger("proxyalign.server")

#: OpenAI parameters the hybrid cannot honour, and the values of each that change nothing (accepted).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logprobs": (None, 0, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),  # /v1/completions only: chat takes tools
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # inert without tools
    "functions": (None, []),  # OpenAI's deprecated function calling: use tools
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "min_p": (None, 0),
    "ignore_eos": (None, False),
}

#: Chat roles the hybrid takes, and what OpenAI's newer names mean here.
_ROLE_NAMES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


@dataclass(frozen=True)
class Plan:
    """One HTTP request as proxyalign calls: ``n`` rows per prompt, choice ``i`` is row ``i``."""

    prompts: list[Prompt]  #: the request's distinct prompts, in order
    n: int
    options: dict[str, Any]  #: proxyalign generation options (validated later by the aligner)
    stream: bool
    include_usage: bool
    provenance: bool
    user: str | None = None
    ignored: list[str] = field(default_factory=list)
    single_tool_call: bool = False  #: ``parallel_tool_calls: false``: answer each choice's first call only

    @property
    def rows(self) -> list[Prompt]:
        """Every row to decode: prompt ``j``'s choice ``k`` is row ``j * n + k`` (OpenAI's choice index);
        with a ``seed``, row ``i`` samples with ``derive_seed(seed, i)``, so choices differ."""
        return [prompt for prompt in self.prompts for _ in range(self.n)]

    @property
    def prompt_field(self) -> str:
        """The request field that holds the prompts, for errors about them."""
        return "messages" if isinstance(self.prompts[0], list) else "prompt"


#: Why a refused parameter has a better place, added to its 400.
_HINTS: dict[str, str] = {
    "tools": "tools are taken by /v1/chat/completions",
    "tool_choice": "tools are taken by /v1/chat/completions",
    "parallel_tool_calls": "tools are taken by /v1/chat/completions",
    "functions": "this is OpenAI's deprecated function calling; send tools instead",
    "function_call": "this is OpenAI's deprecated function calling; send tool_choice instead",
}


def _check_unsupported(body: GenerationRequest, config: ServerConfig) -> list[str]:
    """The unknown or unsupported parameters to ignore (``--ignore-unsupported``); else the first one
    whose value would change something is refused."""
    ignored = []
    for name, value in (body.model_extra or {}).items():
        neutral = NEUTRAL_VALUES.get(name)
        if neutral is not None and _is_neutral(value, neutral):
            continue
        if config.ignore_unsupported:
            ignored.append(name)
            continue
        raise _refusal(body, name, value, neutral)
    return ignored


def _refusal(body: GenerationRequest, name: str, value: Any, neutral: tuple[Any, ...] | None) -> APIError:
    """The 400 for a parameter this endpoint does not take: unknown, or unsupported (naming the value
    that would be accepted, and a better place for it when there is one)."""
    if neutral is None:
        known = ", ".join(f for f in type(body).model_fields if f != "model")
        return APIError(
            400,
            f"unknown parameter {name!r}; this endpoint takes {known}",
            param=name,
            code="unknown_parameter",
        )
    hint = f"{_HINTS[name]}; " if name in _HINTS else ""
    return APIError(
        400,
        f"parameter {name!r} is not supported by this endpoint (got {_json(value)}); {hint}leave it out "
        f"or send {_json(neutral[-1])} (a server started with --ignore-unsupported ignores it)",
        param=name,
        code="unsupported_parameter",
    )


def _json(value: Any) -> str:
    """A value as the client wrote it (``true``, not ``True``)."""
    return json.dumps(value, default=str)


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``neutral`` (``true`` is not ``1`` and ``0`` is not ``false`` here)."""
    return any(isinstance(value, bool) == isinstance(v, bool) and value == v for v in neutral)


def _max_tokens(body: GenerationRequest, config: ServerConfig) -> int:
    given = {
        name: value
        for name in ("max_completion_tokens", "max_tokens")
        if (value := getattr(body, name, None)) is not None
    }
    if len(set(given.values())) > 1:
        raise APIError(
            400,
            f"max_tokens ({body.max_tokens}) and max_completion_tokens ({given['max_completion_tokens']}) "
            "disagree; send one of them",
            param="max_tokens",
        )
    if not given:
        return config.default_max_tokens
    name, value = next(iter(given.items()))
    if not 1 <= value <= config.max_tokens:
        raise APIError(
            400,
            f"{name} must be an integer in [1, {config.max_tokens}] on this server, got {value}",
            param=name,
        )
    return value


def _common(body: GenerationRequest, config: ServerConfig) -> tuple[int, dict[str, Any], bool, bool, bool]:
    """``n``, proxyalign options, stream, include_usage and provenance of either endpoint."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= config.max_n:
        raise APIError(400, f"n must be an integer in [1, {config.max_n}] on this server, got {n}", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > config.max_stop:
        raise APIError(
            400, f"stop has {len(stops)} strings; at most {config.max_stop} on this server", param="stop"
        )
    options: dict[str, Any] = {
        "max_new_tokens": _max_tokens(body, config),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": stops or None,
        "criterion": body.criterion,
        "criterion_params": body.criterion_params,
        "criterion_on": body.criterion_on,
        "mode": body.mode,
        "gamma": body.gamma,
        "response_format": body.response_format,
    }
    options = {key: value for key, value in options.items() if value is not None}
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    include_usage = bool(stream and body.stream_options and body.stream_options.include_usage)
    default_provenance = config.stream_provenance if stream else True
    provenance = default_provenance if body.provenance is None else body.provenance
    return n, options, stream, include_usage, provenance


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """A message's content as text: a string, or its ``text`` parts joined by newlines."""
    if isinstance(content, str):
        return content
    texts = []
    for number, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(
                400,
                f"{where}.content[{number}] is a {part.get('type')!r} part; only text parts "
                "({'type': 'text', 'text': ...}) are supported",
                param=f"{where}.content[{number}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _role(message: ChatMessage, where: str) -> str:
    """The message's role as the aligner names it; refuses what OpenAI has deprecated (function
    messages and calls) and calls on a message that cannot make them."""
    role = _ROLE_NAMES.get(message.role)
    if role is None:
        raise APIError(
            400,
            f"{where}.role is {message.role!r}; the hybrid takes system, developer, user, assistant and "
            "tool messages (for OpenAI's deprecated function messages, send tool messages)",
            param=f"{where}.role",
        )
    if (message.model_extra or {}).get("function_call"):
        raise APIError(
            400,
            f"{where}.function_call is OpenAI's deprecated form; send the call as tool_calls",
            param=f"{where}.function_call",
        )
    if message.tool_calls and role != "assistant":
        raise APIError(
            400, f"{where}.tool_calls: only assistant messages carry tool calls", param=f"{where}.tool_calls"
        )
    return role


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """One OpenAI message as the aligner takes it; the shape of tool calls and tool results is checked
    by the core (which renders them through each model's template)."""
    where = f"messages[{index}]"
    out: dict[str, Any] = {"role": _role(message, where), "content": None}
    if message.content is not None:
        out["content"] = _text(message.content, where)
    elif not message.tool_calls:
        raise APIError(400, f"{where}.content is missing; give the message's text", param=f"{where}.content")
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _tool_options(body: ChatCompletionRequest) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` for the aligner, which checks them (names,
    schemas) before decoding; a forced choice with ``parallel_tool_calls: false`` is constrained to one
    call there (with ``auto`` the answer is cut to its first call here)."""
    options = {"tools": body.tools, "tool_choice": body.tool_choice}
    if body.tools and body.parallel_tool_calls is False:
        options["parallel_tool_calls"] = False
    return {key: value for key, value in options.items() if value is not None}


def plan_chat(body: ChatCompletionRequest, config: ServerConfig) -> Plan:
    """A chat request's plan: its messages go to the aligner as one chat prompt (each model applies its
    own prompt format, e.g. q*'s chat template, with the tools)."""
    ignored = _check_unsupported(body, config)
    if not body.messages:
        raise APIError(400, "messages is empty; give at least one message", param="messages")
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    n, options, stream, usage, provenance = _common(body, config)
    options.update(_tool_options(body))
    single = body.parallel_tool_calls is False
    return Plan([messages], n, options, stream, usage, provenance, body.user, ignored, single)


def plan_completion(body: CompletionRequest, config: ServerConfig) -> Plan:
    """A completion request's plan: one or more text prompts (or per-model texts, an extension)."""
    ignored = _check_unsupported(body, config)
    prompts = _prompts(body.prompt, config)
    n, options, stream, usage, provenance = _common(body, config)
    return Plan(prompts, n, options, stream, usage, provenance, body.user, ignored)


def _prompts(prompt: Any, config: ServerConfig) -> list[Prompt]:
    accepted = "a string, a list of strings, or a mapping from model role (base, aligned) to text"
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Mapping):
        unknown = set(prompt) - set(ROLES)
        if unknown or not prompt or not all(isinstance(v, str) for v in prompt.values()):
            raise APIError(
                400,
                f"prompt must be {accepted}; got keys {sorted(prompt)} (roles: {', '.join(ROLES)})",
                param="prompt",
            )
        return [dict(prompt)]
    if isinstance(prompt, Sequence) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt) or all(
            isinstance(p, list) for p in prompt
        ):
            raise APIError(400, "prompt as token ids is not supported; send text", param="prompt")
        if not all(isinstance(p, str) for p in prompt):
            raise APIError(400, f"prompt must be {accepted}", param="prompt")
        if len(prompt) > config.max_prompts:
            raise APIError(
                400,
                f"prompt has {len(prompt)} prompts; at most {config.max_prompts} per request on this server",
                param="prompt",
            )
        return list(prompt)
    if isinstance(prompt, Sequence) and not isinstance(prompt, str):
        raise APIError(400, "prompt is an empty list; give at least one prompt", param="prompt")
    raise APIError(400, f"prompt must be {accepted}, got {type(prompt).__name__}", param="prompt")


def log_ignored(plan: Plan) -> None:
    if plan.ignored:
        logger.info("ignoring unsupported parameters %s (--ignore-unsupported)", ", ".join(plan.ignored))

"""One validated description of a request's generation settings, shared by every front end.

The Python API, the CLI, the LangChain and LlamaIndex adapters and the HTTP server all check a call's
options with :func:`check_options` before any model runs. A bad value raises
:class:`~proxyalign.InvalidParameterError` naming the parameter, the value given and what is accepted;
booleans are refused where numbers are meant, numbers must be finite, seeds are integers the random
generator takes, stop strings are non-empty strings.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from proxyalign.criteria.base import Criterion
from proxyalign.engine.gamma import GAMMA_LIMITS
from proxyalign.errors import InvalidParameterError

__all__ = [
    "DEFAULT_CRITERION",
    "MODES",
    "SEED_LIMIT",
    "SSS_CRITERION",
    "SSS_MODES",
    "TOOL_CHOICES",
    "GenerationSettings",
    "check_options",
]

#: The criterion a ProxyAligner uses when given none (the paper's best performer on average).
DEFAULT_CRITERION = "confidence_bet"
#: Decoding modes: "token" runs the hybrid token by token (lazy q* where the criterion allows it);
#: "speculative" lets q* draft ``gamma`` tokens that p checks in one forward (same distribution);
#: "sss" is speculative decoding of the ``implicit_reward`` target p q*/q (exact reward-shifted
#: speculative sampling) and "sss_literal" the SSS paper's unnormalised rule (approximate). "auto"
#: chooses token level or speculative (and its gamma) before every step, from this host's measured
#: forward costs and the drafts' acceptance so far: same distribution, the faster way.
MODES: tuple[str, ...] = ("token", "speculative", "sss", "sss_literal", "auto")
SSS_MODES: tuple[str, ...] = ("sss", "sss_literal")
#: The criterion whose target the SSS modes sample (a call in an SSS mode that names none gets it).
SSS_CRITERION = "implicit_reward"
#: ``tool_choice`` values besides a tool's name ("any" is LangChain's word for "required").
TOOL_CHOICES: tuple[str, ...] = ("auto", "none", "required", "any")
#: Seeds are integers in ``[0, SEED_LIMIT)`` (what ``torch.Generator.manual_seed`` takes as a signed 64-bit).
SEED_LIMIT = 2**63


def _integer(name: str, value: Any, low: int, high: int | None = None, high_text: str = "") -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value < high):
        return int(value)
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high_text or high})"
    raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _number(name: str, value: Any, accepted: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    raise ValueError(f"{name} must be {accepted}, got {value!r}")


class GenerationSettings(BaseModel):
    """Per-call generation options; ``None`` keeps the aligner's default (see ``GenerationConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    criterion: str | Criterion | None = None
    criterion_params: dict[str, Any] | None = None
    criterion_on: Literal["scaled", "raw"] | None = None
    mode: str | None = None
    gamma: int | Literal["adaptive"] | None = None
    #: Per call only (no instance default): checked in depth by proxyalign.constrained and the aligner.
    response_format: Any = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("parallel_tool_calls", mode="before")
    @classmethod
    def _parallel(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        raise ValueError(f"parallel_tool_calls must be true or false, got {value!r}")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _max_new_tokens(cls, value: Any) -> Any:
        return None if value is None else _integer("max_new_tokens", value, 1)

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> Any:
        if value is None:
            return None
        number = _number("temperature", value, "a finite number >= 0 (0 = greedy)")
        if number < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {value!r}")
        return number

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, value: Any) -> Any:
        return None if value is None else _integer("top_k", value, 1)

    @field_validator("top_p", mode="before")
    @classmethod
    def _top_p(cls, value: Any) -> Any:
        if value is None:
            return None
        number = _number("top_p", value, "a number in (0, 1]")
        if not 0 < number <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {value!r}")
        return number

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        return None if value is None else _integer("seed", value, 0, SEED_LIMIT, "2**63")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        accepted = "a string or a list of non-empty strings"
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, Mapping | bytes) or not isinstance(value, Iterable):
            raise ValueError(f"stop must be {accepted}, got {value!r}")
        stops = tuple(value)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be {accepted}, got {value!r}")
        return stops

    @field_validator("criterion", mode="before")
    @classmethod
    def _criterion(cls, value: Any) -> Any:
        if value is None or isinstance(value, str | Criterion):
            return value
        raise ValueError(
            f"criterion must be a criterion name (see `proxyalign criteria`) or a Criterion, got {value!r}"
        )

    @field_validator("criterion_params", mode="before")
    @classmethod
    def _criterion_params(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ValueError(
                f"criterion_params must be a mapping from parameter names to values, got {value!r}"
            )
        return dict(value)

    @field_validator("criterion_on", mode="before")
    @classmethod
    def _criterion_on(cls, value: Any) -> Any:
        if value is None or value in ("scaled", "raw"):
            return value
        raise ValueError(f"criterion_on must be 'scaled' or 'raw', got {value!r}")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if value is None or value in MODES:
            return value
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {value!r}")

    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma(cls, value: Any) -> Any:
        if value is None or value == "adaptive":
            return value
        low, high = GAMMA_LIMITS
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high:
            return int(value)
        raise ValueError(f"gamma must be an integer in [{low}, {high}] or 'adaptive', got {value!r}")

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        if value is None:
            return None
        from proxyalign.tools.render import normalize_tools

        try:
            return normalize_tools(value)
        except InvalidParameterError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if value is None or value in TOOL_CHOICES:
            return value
        name = value.get("function", value).get("name") if isinstance(value, Mapping) else None
        if isinstance(value, str) and value:
            name = value
        if isinstance(name, str) and name:
            return name
        raise ValueError(
            f"tool_choice must be one of {', '.join(TOOL_CHOICES)}, a tool's name, or "
            f'{{"type": "function", "function": {{"name": ...}}}}; got {value!r}'
        )

    def given(self) -> dict[str, Any]:
        """The options that were set (not None), as engine arguments."""
        return {k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None}


def _message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        text = str(item.get("msg", ""))
        text = text.removeprefix("Value error, ")
        if not text.startswith(tuple(GenerationSettings.model_fields)):
            field = ".".join(str(p) for p in item.get("loc", ()))
            text = f"{field}: {text}, got {item.get('input')!r}"
        parts.append(text)
    return "; ".join(parts)


def check_options(options: Mapping[str, Any]) -> GenerationSettings:
    """Validate a call's options: unknown names and bad values raise ``InvalidParameterError``."""
    unknown = set(options) - set(GenerationSettings.model_fields)
    if unknown:
        accepted = ", ".join(GenerationSettings.model_fields)
        raise InvalidParameterError(f"unknown generation option(s) {sorted(unknown)}; accepted: {accepted}")
    try:
        return GenerationSettings(**options)
    except ValidationError as exc:
        raise InvalidParameterError(_message(exc)) from None

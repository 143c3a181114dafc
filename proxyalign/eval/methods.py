"""The method mini-language and sweeps: ``confidence_bet[margin=0.2]``, ``dual_kad.threshold=0.2,0.4``.

A *method* is a criterion with resolved parameters (defaults filled in through the criterion registry);
its :attr:`Method.label` names it in record keys, tables and plots. A *sweep* lists values of one
parameter to try, on every method that has it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxyalign.errors import ProxyAlignError
from proxyalign.plugins import get_criterion
from proxyalign.roles import ALIGNED, BASE

__all__ = [
    "GENERIC_SWEEP_NAMES",
    "Method",
    "Sweep",
    "format_value",
    "parse_methods",
    "parse_sweep",
    "resolve_method",
    "sweep_for",
]

#: Sweep names that stand for "the criterion's own parameter" when it has exactly one
#: (confidence_bet: margin; dual_kad, nudging: threshold; primal_kad: alpha).
GENERIC_SWEEP_NAMES = ("lambda", "margin", "threshold", "alpha")


def format_value(value: float) -> str:
    """A parameter value as it appears in labels and sweeps: ``0.2``, ``1``, ``1e-05``."""
    return format(float(value), "g")


@dataclass(frozen=True)
class Method:
    """A criterion with resolved parameters (defaults filled in); ``pinned`` are the ones the user set."""

    criterion: str
    params: tuple[tuple[str, float], ...] = ()
    pinned: tuple[str, ...] = ()

    @property
    def param_dict(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """``base``, ``confidence_bet[margin=0.2]``: the method's name in keys, tables and plots."""
        if not self.params:
            return self.criterion
        inner = ",".join(f"{k}={format_value(v)}" for k, v in self.params)
        return f"{self.criterion}[{inner}]"

    def with_param(self, name: str, value: float) -> Method:
        return resolve_method(self.criterion, {**self.param_dict, name: value}, self.pinned)

    @property
    def roles(self) -> tuple[str, ...]:
        """The models whose prompts steer the output (for stop strings)."""
        criterion = get_criterion(self.criterion, **self.param_dict)
        if criterion.always_rejects:
            return (ALIGNED,)
        if criterion.never_rejects:
            return (BASE,)
        return (BASE, ALIGNED)


def resolve_method(name: str, params: Mapping[str, Any] | None = None, pinned: Iterable[str] = ()) -> Method:
    """Validate a criterion and its parameters through the registry; fill in the defaults."""
    criterion = get_criterion(name, **dict(params or {}))
    resolved = tuple((k, float(v)) for k, v in sorted(criterion.params.items()))
    return Method(name, resolved, tuple(sorted(set(pinned))))


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_METHOD = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<params>[^\[\]]*)\])?$")


def parse_methods(specs: str | Sequence[str | Method]) -> list[Method]:
    """``"base,aligned,confidence_bet[margin=0.2],dual_kad"`` -> resolved :class:`Method` list.

    Parameters go in brackets, several separated by commas: ``pkg:name[a=1,b=0.5]``. Duplicates (the
    same criterion and resolved parameters) are dropped.
    """
    items: list[str | Method] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        items.extend(_split_top_level(spec) if isinstance(spec, str) else [spec])
    methods: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            method = item
        else:
            match = _METHOD.match(item)
            if match is None:
                raise ProxyAlignError(
                    f"cannot parse method {item!r}; write NAME or NAME[param=value,...], e.g. "
                    "confidence_bet[margin=0.2]"
                )
            params: dict[str, str] = {}
            for pair in _split_top_level(match.group("params") or ""):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise ProxyAlignError(f"method {item!r}: parameters are NAME=VALUE, got {pair!r}")
                params[key.strip()] = value.strip()
            method = resolve_method(match.group("name").strip(), params, params)
        if method.label not in {m.label for m in methods}:
            methods.append(method)
    if not methods:
        raise ProxyAlignError("no methods given; e.g. --methods base,aligned,confidence_bet")
    return methods


@dataclass(frozen=True)
class Sweep:
    """Values of one parameter to try: ``margin=0,0.1,0.2`` or ``dual_kad.threshold=0.2,0.4``."""

    param: str
    values: tuple[float, ...]
    criterion: str | None = None

    def target(self, method: Method) -> str | None:
        """The parameter of ``method`` this sweep varies, or None when it does not apply.

        An exact parameter name applies to every criterion that has it; a generic name (``lambda``,
        ``margin``, ``threshold``, ``alpha``) also maps onto the single parameter of a criterion that
        has just one under another name. A parameter the method pins (``confidence_bet[margin=0.1]``)
        is not swept.
        """
        if self.criterion is not None and self.criterion != method.criterion:
            return None
        names = [k for k, _ in method.params]
        if self.param in names:
            chosen = self.param
        elif self.param in GENERIC_SWEEP_NAMES and len(names) == 1:
            chosen = names[0]
        else:
            return None
        return None if chosen in method.pinned else chosen

    @property
    def text(self) -> str:
        prefix = f"{self.criterion}." if self.criterion else ""
        return f"{prefix}{self.param}=" + ",".join(format_value(v) for v in self.values)


def parse_sweep(spec: str | Sweep) -> Sweep:
    """``"margin=0,0.1,0.2"`` or ``"dual_kad.threshold=0.2,0.3,0.4"`` -> :class:`Sweep`."""
    if isinstance(spec, Sweep):
        return spec
    name, sep, values = spec.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise ProxyAlignError(f"--sweep expects [CRITERION.]PARAM=V1,V2,..., got {spec!r}")
    criterion, dot, param = name.strip().rpartition(".")
    try:
        numbers = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        raise ProxyAlignError(f"--sweep {spec!r}: values must be numbers separated by commas") from None
    if not numbers:
        raise ProxyAlignError(f"--sweep {spec!r}: give at least one value")
    return Sweep(param.strip(), numbers, criterion.strip() if dot else None)


def sweep_for(method: Method, sweeps: Sequence[Sweep]) -> tuple[Sweep, str] | None:
    """The sweep that applies to ``method`` (a criterion-qualified one first) and the parameter it varies."""
    ordered = sorted(sweeps, key=lambda s: s.criterion is None)
    for sweep in ordered:
        target = sweep.target(method)
        if target is not None:
            return sweep, target
    return None

"""The criterion registry: built-ins first, then third-party entry points, loaded one at a time.

The loading (failures recorded with package and version, collisions, ``PROXYALIGN_DISABLE_PLUGINS``)
is shared with the tool-call parsers in :mod:`proxyalign.registry`; this module adds what is specific
to criteria: the ``register_criteria`` hook, the Criterion checks, lookups and ``get_criterion``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxyalign import hookspecs
from proxyalign.criteria import BUILTIN_MODULES, Criterion
from proxyalign.errors import InvalidParameterError, UnknownCriterionError
from proxyalign.registry import (
    BUILTIN_PACKAGE,
    DISABLE_ENV,
    PluginFailure,
    PluginRegistry,
    Shared,
    load_plugins,
)

__all__ = [
    "DISABLE_ENV",
    "CriterionInfo",
    "PluginFailure",
    "Registry",
    "get_criterion",
    "get_registry",
    "list_criteria",
    "reload_registry",
]


@dataclass(frozen=True)
class CriterionInfo:
    """A registered criterion and where it came from."""

    name: str
    cls: type[Criterion]
    package: str
    version: str
    plugin: str

    @property
    def qualified_name(self) -> str:
        return f"{self.package}:{self.name}"

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (used by ``proxyalign criteria --json``)."""
        return {
            "name": self.name,
            "qualified_name": self.qualified_name,
            "package": self.package,
            "version": self.version,
            "description": self.cls.description,
            "reference": self.cls.reference,
            "reads": sorted(self.cls.reads),
            "params": [
                {
                    "name": p.name,
                    "default": p.default,
                    "low": p.low,
                    "high": p.high,
                    "description": p.description,
                }
                for p in self.cls.params
            ],
        }


class Registry(PluginRegistry[CriterionInfo]):
    """Criteria by name; collisions and failures kept for reporting rather than raised."""

    @staticmethod
    def _name_of(info: CriterionInfo) -> str:
        return info.name

    def lookup(self, name: str) -> CriterionInfo:
        """By bare name or ``package:name``; unknown names list what is available."""
        info = self.by_qualified_name.get(name) if ":" in name else self.by_name.get(name)
        if info is None:
            available = ", ".join(sorted(self.by_name)) or "none"
            hint = ""
            if ":" in name:
                qualified = ", ".join(sorted(self.by_qualified_name))
                hint = f"; qualified names: {qualified}"
            raise UnknownCriterionError(f"unknown criterion {name!r}; available: {available}{hint}")
        return info

    def criteria(self) -> list[CriterionInfo]:
        """Every distinct registered criterion (shadowed providers included), built-ins first."""
        infos = list(self.by_qualified_name.values())
        return sorted(infos, key=lambda i: (not i.builtin, i.name, i.package))


def _criterion_info(cls: Any, package: str, version: str, plugin: str) -> CriterionInfo:
    """What a plugin's ``register(cls)`` adds: only a named Criterion subclass is accepted."""
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register() expects a Criterion subclass, got {cls!r}")
    if not getattr(cls, "name", None):
        raise TypeError(f"criterion class {cls.__name__} has no 'name'")
    return CriterionInfo(cls.name, cls, package, version, plugin)


def build_registry(load_entry_points: bool | None = None) -> Registry:
    """Load built-ins, then (unless disabled) every entry point of ``proxyalign.criteria``."""
    registry = Registry()
    load_plugins(
        registry,
        hook="register_criteria",
        group=hookspecs.ENTRY_POINT_GROUP,
        builtin_modules=BUILTIN_MODULES,
        make_info=_criterion_info,
        load_entry_points=load_entry_points,
    )
    return registry


# a lambda, so the global is looked up at build time (as a monkeypatched builder would expect)
_shared: Shared[Registry] = Shared(lambda: build_registry())


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return _shared.get()


def reload_registry() -> Registry:
    """Rebuild the registry (after installing a plugin in a running process, or in tests)."""
    return _shared.reload()


def list_criteria() -> list[CriterionInfo]:
    """Every available criterion with its package, version and parameters."""
    return get_registry().criteria()


def get_criterion(name: str | Criterion, **params: Any) -> Criterion:
    """Instantiate a criterion by name (``"dual_kad"`` or ``"package:dual_kad"``) with validated params.

    An existing :class:`Criterion` instance is returned as is (params must then be empty).
    """
    if isinstance(name, Criterion):
        if params:
            raise InvalidParameterError("criterion_params cannot be combined with a criterion instance")
        return name
    if not isinstance(name, str):
        raise InvalidParameterError(f"criterion must be a name or a Criterion, got {type(name).__name__}")
    info = get_registry().lookup(name)
    criterion = info.cls(**params)
    criterion.package = info.package  # type: ignore[attr-defined]
    criterion.package_version = info.version  # type: ignore[attr-defined]
    return criterion


def criterion_label(criterion: Criterion) -> str:
    """``name`` plus its providing package, for error messages (:attr:`Criterion.label`)."""
    return criterion.label

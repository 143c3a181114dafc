"""The criterion registry: built-ins first, then third-party entry points, loaded one at a time.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import and keeps
only one of two same-named entry points, so we iterate the entry points ourselves: each failure is
recorded with its package and version and the rest still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from proxyalign import hookspecs
from proxyalign.criteria import BUILTIN_MODULES, Criterion
from proxyalign.errors import InvalidParameterError, UnknownCriterionError

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

#: Set to 1/true/yes to load only the built-in criteria.
DISABLE_ENV = "PROXYALIGN_DISABLE_PLUGINS"
BUILTIN_PACKAGE = "proxyalign"


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


@dataclass(frozen=True)
class PluginFailure:
    """A plugin (or one criterion of it) that could not be used, and why."""

    plugin: str
    package: str
    version: str
    error: str

    def __str__(self) -> str:
        return f"{self.package} {self.version} ({self.plugin}): {self.error}"


@dataclass
class Registry:
    """Criteria by name; collisions and failures kept for reporting rather than raised."""

    by_name: dict[str, CriterionInfo] = field(default_factory=dict)
    by_qualified_name: dict[str, CriterionInfo] = field(default_factory=dict)
    collisions: dict[str, list[CriterionInfo]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def add(self, info: CriterionInfo) -> None:
        """Register ``info``; on a name clash the built-in (else the first loaded) keeps the bare name."""
        self.by_qualified_name.setdefault(info.qualified_name, info)
        current = self.by_name.get(info.name)
        if current is None:
            self.by_name[info.name] = info
            return
        if current.cls is info.cls:
            return
        providers = self.collisions.setdefault(info.name, [current])
        providers.append(info)
        if info.builtin and not current.builtin:
            self.by_name[info.name] = info

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


def _plugins_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = entry_point.dist
    if dist is None:
        return entry_point.value.split(":")[0], "unknown"
    return dist.metadata["Name"] or dist.name, dist.version


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _build_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _register_plugin(
    manager: pluggy.PluginManager, plugin: object, name: str, origin: tuple[str, str], registry: Registry
) -> None:
    """Register one plugin; pluggy validation errors and misspelled hooks become recorded failures."""
    try:
        manager.register(plugin, name=name)
    except Exception as exc:
        registry.failures.append(PluginFailure(name, *origin, _error_text(exc)))
        return
    try:
        manager.check_pending()  # earlier plugins passed, so only this one can fail here
    except pluggy.PluginValidationError as exc:
        manager.unregister(plugin)
        registry.failures.append(
            PluginFailure(name, *origin, f"{_error_text(exc)} (the hook is named 'register_criteria')")
        )
        return
    if not any(impl.plugin is plugin for impl in manager.hook.register_criteria.get_hookimpls()):
        manager.unregister(plugin)
        registry.failures.append(
            PluginFailure(name, *origin, "no @hookimpl register_criteria(register) found; nothing registered")
        )


def _iter_entry_points() -> Iterable[metadata.EntryPoint]:
    seen: set[tuple[str, str, str]] = set()
    for entry_point in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        key = (entry_point.name, entry_point.value, _distribution_of(entry_point)[0])
        if key not in seen:  # the same distribution visible twice on sys.path
            seen.add(key)
            yield entry_point


def _collect(manager: pluggy.PluginManager, origins: dict[str, tuple[str, str]], registry: Registry) -> None:
    """Call each plugin's hook on its own so a hook that raises only loses that plugin."""
    for impl in manager.hook.register_criteria.get_hookimpls():  # registration order
        package, version = origins[impl.plugin_name]

        def register(
            cls: type[Criterion], *, _origin: tuple[str, str, str] = (package, version, impl.plugin_name)
        ) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Criterion)):
                raise TypeError(f"register() expects a Criterion subclass, got {cls!r}")
            if not getattr(cls, "name", None):
                raise TypeError(f"criterion class {cls.__name__} has no 'name'")
            registry.add(CriterionInfo(cls.name, cls, *_origin))

        try:
            impl.function(register=register)
        except Exception as exc:
            registry.failures.append(PluginFailure(impl.plugin_name, package, version, _error_text(exc)))


def build_registry(load_entry_points: bool | None = None) -> Registry:
    """Load built-ins, then (unless disabled) every entry point of ``proxyalign.criteria``."""
    registry = Registry()
    manager = _build_manager()
    origins: dict[str, tuple[str, str]] = {}
    own_version = metadata.version(BUILTIN_PACKAGE) if _is_installed() else "dev"
    for module_name in BUILTIN_MODULES:
        origins[module_name] = (BUILTIN_PACKAGE, own_version)
        _register_plugin(
            manager, importlib.import_module(module_name), module_name, origins[module_name], registry
        )
    if load_entry_points is None:
        load_entry_points = not _plugins_disabled()
    if load_entry_points:
        for entry_point in _iter_entry_points():
            origin = _distribution_of(entry_point)
            plugin_name = f"{origin[0]}:{entry_point.name}"
            if manager.has_plugin(plugin_name):
                registry.failures.append(
                    PluginFailure(plugin_name, *origin, "duplicate entry point name; ignored")
                )
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:
                registry.failures.append(PluginFailure(plugin_name, *origin, _error_text(exc)))
                continue
            origins[plugin_name] = origin
            _register_plugin(manager, plugin, plugin_name, origin, registry)
    _collect(manager, origins, registry)
    return registry


def _is_installed() -> bool:
    try:
        metadata.version(BUILTIN_PACKAGE)
    except metadata.PackageNotFoundError:
        return False
    return True


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = build_registry()
        return _registry


def reload_registry() -> Registry:
    """Rebuild the registry (after installing a plugin in a running process, or in tests)."""
    global _registry
    with _lock:
        _registry = build_registry()
        return _registry


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

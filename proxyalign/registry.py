"""Plugin-registry machinery shared by the criteria and the tool-call parsers.

Both registries load their built-ins through the same pluggy hook a plugin uses, then every entry point
of their group. pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to
import and keeps only one of two same-named entry points, so we iterate the entry points ourselves:
each failure is recorded with its package and version and the rest still load. What a registry holds
(criteria or parsers) and how it looks them up stays with its own module; this one imports neither.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import pluggy

from proxyalign import hookspecs

__all__ = [
    "BUILTIN_PACKAGE",
    "DISABLE_ENV",
    "PluginFailure",
    "PluginRegistry",
    "Shared",
    "error_text",
    "load_plugins",
]

#: Set to 1/true/yes to load only the built-in criteria (and built-in tool-call parsers).
DISABLE_ENV = "PROXYALIGN_DISABLE_PLUGINS"
BUILTIN_PACKAGE = "proxyalign"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin (or one criterion of it) that could not be used, and why."""

    plugin: str
    package: str
    version: str
    error: str

    def __str__(self) -> str:
        return f"{self.package} {self.version} ({self.plugin}): {self.error}"


class _Info(Protocol):
    """What :class:`PluginRegistry` needs of an entry: its class, its qualified name, built-in or not."""

    @property
    def cls(self) -> Any: ...

    @property
    def qualified_name(self) -> str: ...

    @property
    def builtin(self) -> bool: ...


InfoT = TypeVar("InfoT", bound=_Info)
T = TypeVar("T")


@dataclass
class PluginRegistry(Generic[InfoT]):
    """Entries by name; collisions and failures kept for reporting rather than raised.

    Subclasses say which attribute is the bare name (:meth:`_name_of`) and how lookups fail.
    """

    by_name: dict[str, InfoT] = field(default_factory=dict)
    by_qualified_name: dict[str, InfoT] = field(default_factory=dict)
    collisions: dict[str, list[InfoT]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    @staticmethod
    def _name_of(info: InfoT) -> str:
        raise NotImplementedError

    def add(self, info: InfoT) -> None:
        """Register ``info``; on a name clash the built-in (else the first loaded) keeps the bare name."""
        self.by_qualified_name.setdefault(info.qualified_name, info)
        name = self._name_of(info)
        current = self.by_name.get(name)
        if current is None:
            self.by_name[name] = info
            return
        if current.cls is info.cls:
            return
        self.collisions.setdefault(name, [current]).append(info)
        if info.builtin and not current.builtin:
            self.by_name[name] = info


def plugins_disabled() -> bool:
    """Whether :data:`DISABLE_ENV` asks for the built-ins only."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def error_text(exc: BaseException) -> str:
    """One line (``Type: message``) for a failure record: the traceback is noise to a user."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = entry_point.dist
    if dist is None:
        return entry_point.value.split(":")[0], "unknown"
    return dist.metadata["Name"] or dist.name, dist.version


def _own_version() -> str:
    try:
        return metadata.version(BUILTIN_PACKAGE)
    except metadata.PackageNotFoundError:
        return "dev"


def _iter_entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    seen: set[tuple[str, str, str]] = set()
    for entry_point in metadata.entry_points(group=group):
        key = (entry_point.name, entry_point.value, _distribution_of(entry_point)[0])
        if key not in seen:  # the same distribution visible twice on sys.path
            seen.add(key)
            yield entry_point


def _register_plugin(
    manager: pluggy.PluginManager,
    hook: str,
    plugin: object,
    name: str,
    origin: tuple[str, str],
    failures: list[PluginFailure],
) -> None:
    """Register one plugin; pluggy validation errors and misspelled hooks become recorded failures."""
    try:
        manager.register(plugin, name=name)
    except Exception as exc:
        failures.append(PluginFailure(name, *origin, error_text(exc)))
        return
    try:
        manager.check_pending()  # earlier plugins passed, so only this one can fail here
    except pluggy.PluginValidationError as exc:
        manager.unregister(plugin)
        failures.append(PluginFailure(name, *origin, f"{error_text(exc)} (the hook is named {hook!r})"))
        return
    if not any(impl.plugin is plugin for impl in getattr(manager.hook, hook).get_hookimpls()):
        manager.unregister(plugin)
        failures.append(
            PluginFailure(name, *origin, f"no @hookimpl {hook}(register) found; nothing registered")
        )


def load_plugins(
    registry: PluginRegistry[InfoT],
    *,
    hook: str,
    group: str,
    builtin_modules: Iterable[str],
    make_info: Callable[[Any, str, str, str], InfoT],
    load_entry_points: bool | None = None,
) -> None:
    """Fill ``registry``: the built-in modules, then (unless disabled) every entry point of ``group``.

    Each plugin's ``hook`` is called on its own with a ``register(cls)`` that passes ``cls`` and its
    origin (package, version, plugin name) to ``make_info``; a ``TypeError`` there, or anything the
    hook raises, only loses that plugin and is recorded in ``registry.failures``.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    origins: dict[str, tuple[str, str]] = {}
    own_version = _own_version()
    for module_name in builtin_modules:
        origins[module_name] = (BUILTIN_PACKAGE, own_version)
        module = importlib.import_module(module_name)
        _register_plugin(manager, hook, module, module_name, origins[module_name], registry.failures)
    if load_entry_points is None:
        load_entry_points = not plugins_disabled()
    if load_entry_points:
        for entry_point in _iter_entry_points(group):
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
                registry.failures.append(PluginFailure(plugin_name, *origin, error_text(exc)))
                continue
            origins[plugin_name] = origin
            _register_plugin(manager, hook, plugin, plugin_name, origin, registry.failures)
    for impl in getattr(manager.hook, hook).get_hookimpls():  # registration order: built-ins first
        package, version = origins[impl.plugin_name]

        def register(
            cls: Any, *, _origin: tuple[str, str, str] = (package, version, impl.plugin_name)
        ) -> None:
            registry.add(make_info(cls, *_origin))

        try:
            impl.function(register=register)
        except Exception as exc:
            registry.failures.append(PluginFailure(impl.plugin_name, package, version, error_text(exc)))


class Shared(Generic[T]):
    """A process-wide value built on first use; :meth:`reload` rebuilds it. One lock guards both."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

    def reload(self) -> T:
        with self._lock:
            self._value = self._build()
            return self._value

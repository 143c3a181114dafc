"""The tool-call parser registry: built-ins first, then entry points of ``proxyalign.tool_parsers``.

It works like the criterion registry (:mod:`proxyalign.plugins`): every plugin is loaded and called on
its own, so one that fails to import, misnames its hook or raises is recorded in ``failures`` (package,
version, error) and the others still load; on a name clash the built-in keeps the bare name and the
clash is recorded; ``PROXYALIGN_DISABLE_PLUGINS=1`` loads only the built-ins.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from proxyalign import hookspecs
from proxyalign.errors import InvalidParameterError
from proxyalign.plugins import (
    BUILTIN_PACKAGE,
    PluginFailure,
    _distribution_of,
    _error_text,
    _is_installed,
    _plugins_disabled,
)
from proxyalign.tools.parsers import ToolCallParser

__all__ = [
    "BUILTIN_MODULES",
    "FALLBACK_FAMILY",
    "ToolParserInfo",
    "ToolParserRegistry",
    "build_tool_parser_registry",
    "get_tool_parser",
    "get_tool_parser_registry",
    "list_tool_parsers",
    "parser_for_template",
    "parser_for_tokenizer",
    "reload_tool_parsers",
]

#: Modules registered before any entry point, so built-in names win collisions.
BUILTIN_MODULES = ("proxyalign.tools.parsers",)
#: The parser used when no registered parser recognizes a template (or there is none).
FALLBACK_FAMILY = "plain"
HOOK = "register_tool_parsers"


@dataclass(frozen=True)
class ToolParserInfo:
    """A registered parser class and where it came from."""

    family: str
    cls: type[ToolCallParser]
    package: str
    version: str
    plugin: str

    @property
    def qualified_name(self) -> str:
        return f"{self.package}:{self.family}"

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "qualified_name": self.qualified_name,
            "package": self.package,
            "version": self.version,
            "description": self.cls.description,
        }


@dataclass
class ToolParserRegistry:
    """Parsers by family name, in registration order; collisions and failures kept for reporting."""

    by_name: dict[str, ToolParserInfo] = field(default_factory=dict)
    by_qualified_name: dict[str, ToolParserInfo] = field(default_factory=dict)
    collisions: dict[str, list[ToolParserInfo]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def add(self, info: ToolParserInfo) -> None:
        self.by_qualified_name.setdefault(info.qualified_name, info)
        current = self.by_name.get(info.family)
        if current is None:
            self.by_name[info.family] = info
            return
        if current.cls is info.cls:
            return
        self.collisions.setdefault(info.family, [current]).append(info)
        if info.builtin and not current.builtin:
            self.by_name[info.family] = info

    def lookup(self, name: str) -> ToolParserInfo:
        """By family (``"hermes"``) or ``package:family``; an unknown name lists the available ones."""
        info = self.by_qualified_name.get(name) if ":" in name else self.by_name.get(name)
        if info is None:
            available = ", ".join(sorted(self.by_qualified_name if ":" in name else self.by_name)) or "none"
            raise InvalidParameterError(f"unknown tool-call parser {name!r}; available: {available}")
        return info

    def parsers(self) -> list[ToolParserInfo]:
        """Every distinct registered parser, built-ins first, then in registration order."""
        infos = list(self.by_qualified_name.values())
        return sorted(infos, key=lambda info: not info.builtin)  # stable: keeps registration order

    def for_template(self, chat_template: str | None) -> ToolParserInfo:
        """The first parser (built-ins first) whose ``detect`` accepts the template, else the fallback.

        A ``detect`` that raises is skipped with a warning naming its package.
        """
        if chat_template:
            for info in self.parsers():
                if self.by_name.get(info.family) is not info:
                    continue  # shadowed by a collision: reachable only by qualified name
                try:
                    if info.cls.detect(chat_template):
                        return info
                except Exception as exc:
                    warnings.warn(
                        f"tool-call parser {info.qualified_name} {info.version}: detect() raised "
                        f"{_error_text(exc)}; skipped",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self.lookup(FALLBACK_FAMILY)


def _register_plugin(
    manager: pluggy.PluginManager,
    plugin: object,
    name: str,
    origin: tuple[str, str],
    registry: ToolParserRegistry,
) -> None:
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
            PluginFailure(name, *origin, f"{_error_text(exc)} (the hook is named {HOOK!r})")
        )
        return
    if not any(impl.plugin is plugin for impl in manager.hook.register_tool_parsers.get_hookimpls()):
        manager.unregister(plugin)
        registry.failures.append(
            PluginFailure(name, *origin, f"no @hookimpl {HOOK}(register) found; nothing registered")
        )


def _iter_entry_points() -> Iterable[metadata.EntryPoint]:
    seen: set[tuple[str, str, str]] = set()
    for entry_point in metadata.entry_points(group=hookspecs.TOOL_PARSER_ENTRY_POINT_GROUP):
        key = (entry_point.name, entry_point.value, _distribution_of(entry_point)[0])
        if key not in seen:  # the same distribution visible twice on sys.path
            seen.add(key)
            yield entry_point


def _collect(
    manager: pluggy.PluginManager, origins: dict[str, tuple[str, str]], registry: ToolParserRegistry
) -> None:
    """Call each plugin's hook on its own, so a hook that raises only loses that plugin."""
    for impl in manager.hook.register_tool_parsers.get_hookimpls():  # registration order
        package, version = origins[impl.plugin_name]

        def register(
            cls: Any, *, _origin: tuple[str, str, str] = (package, version, impl.plugin_name)
        ) -> None:
            if not (isinstance(cls, type) and issubclass(cls, ToolCallParser)):
                raise TypeError(f"register() expects a ToolCallParser subclass, got {cls!r}")
            if not isinstance(getattr(cls, "family", None), str) or not cls.family or ":" in cls.family:
                raise TypeError(f"tool-call parser class {cls.__name__} needs a 'family' name (no ':')")
            registry.add(ToolParserInfo(cls.family, cls, *_origin))

        try:
            impl.function(register=register)
        except Exception as exc:
            registry.failures.append(PluginFailure(impl.plugin_name, package, version, _error_text(exc)))


def build_tool_parser_registry(load_entry_points: bool | None = None) -> ToolParserRegistry:
    """Load the built-ins, then (unless disabled) every entry point of ``proxyalign.tool_parsers``."""
    registry = ToolParserRegistry()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    origins: dict[str, tuple[str, str]] = {}
    own_version = metadata.version(BUILTIN_PACKAGE) if _is_installed() else "dev"
    for module_name in BUILTIN_MODULES:
        origins[module_name] = (BUILTIN_PACKAGE, own_version)
        module = importlib.import_module(module_name)
        _register_plugin(manager, module, module_name, origins[module_name], registry)
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


_registry: ToolParserRegistry | None = None
_lock = threading.Lock()


def get_tool_parser_registry() -> ToolParserRegistry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = build_tool_parser_registry()
        return _registry


def reload_tool_parsers() -> ToolParserRegistry:
    """Rebuild the registry (after installing a plugin in a running process, or in tests)."""
    global _registry
    with _lock:
        _registry = build_tool_parser_registry()
        return _registry


def list_tool_parsers() -> list[ToolParserInfo]:
    return get_tool_parser_registry().parsers()


def get_tool_parser(name: str) -> ToolCallParser:
    """A parser by family (``"hermes"``, ``"plain"``) or ``package:family``."""
    if not isinstance(name, str):
        raise InvalidParameterError(f"tool-call parser must be a family name, got {type(name).__name__}")
    return get_tool_parser_registry().lookup(name).cls()


def parser_for_template(chat_template: str | None) -> ToolCallParser:
    """The parser of a chat template's family; ``plain`` when none recognizes it (or there is none)."""
    return get_tool_parser_registry().for_template(chat_template).cls()


def parser_for_tokenizer(tokenizer: Any) -> ToolCallParser:
    """:func:`parser_for_template` on ``tokenizer.chat_template`` (a dict of named templates: "default")."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return parser_for_template(template if isinstance(template, str) else None)

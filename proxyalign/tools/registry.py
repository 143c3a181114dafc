"""The tool-call parser registry: built-ins first, then entry points of ``proxyalign.tool_parsers``.

It shares its loading with the criterion registry (:mod:`proxyalign.registry`): every plugin is loaded
and called on its own, so one that fails to import, misnames its hook or raises is recorded in
``failures`` (package, version, error) and the others still load; on a name clash the built-in keeps the
bare name and the clash is recorded; ``PROXYALIGN_DISABLE_PLUGINS=1`` loads only the built-ins. What is
specific to parsers (families, ``detect``, the ``plain`` fallback) stays here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from proxyalign import hookspecs
from proxyalign.errors import InvalidParameterError
from proxyalign.registry import BUILTIN_PACKAGE, PluginRegistry, Shared, error_text, load_plugins
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


class ToolParserRegistry(PluginRegistry[ToolParserInfo]):
    """Parsers by family name, in registration order; collisions and failures kept for reporting."""

    @staticmethod
    def _name_of(info: ToolParserInfo) -> str:
        return info.family

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
                        f"{error_text(exc)}; skipped",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self.lookup(FALLBACK_FAMILY)


def _tool_parser_info(cls: Any, package: str, version: str, plugin: str) -> ToolParserInfo:
    """What a plugin's ``register(cls)`` adds: only a ToolCallParser subclass with a family name."""
    if not (isinstance(cls, type) and issubclass(cls, ToolCallParser)):
        raise TypeError(f"register() expects a ToolCallParser subclass, got {cls!r}")
    if not isinstance(getattr(cls, "family", None), str) or not cls.family or ":" in cls.family:
        raise TypeError(f"tool-call parser class {cls.__name__} needs a 'family' name (no ':')")
    return ToolParserInfo(cls.family, cls, package, version, plugin)


def build_tool_parser_registry(load_entry_points: bool | None = None) -> ToolParserRegistry:
    """Load the built-ins, then (unless disabled) every entry point of ``proxyalign.tool_parsers``."""
    registry = ToolParserRegistry()
    load_plugins(
        registry,
        hook=HOOK,
        group=hookspecs.TOOL_PARSER_ENTRY_POINT_GROUP,
        builtin_modules=BUILTIN_MODULES,
        make_info=_tool_parser_info,
        load_entry_points=load_entry_points,
    )
    return registry


# a lambda, so the global is looked up at build time (as a monkeypatched builder would expect)
_shared: Shared[ToolParserRegistry] = Shared(lambda: build_tool_parser_registry())


def get_tool_parser_registry() -> ToolParserRegistry:
    """The process-wide registry, built on first use."""
    return _shared.get()


def reload_tool_parsers() -> ToolParserRegistry:
    """Rebuild the registry (after installing a plugin in a running process, or in tests)."""
    return _shared.reload()


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

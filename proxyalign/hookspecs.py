"""The pluggy hook specifications a criterion plugin implements.

A plugin is any module or object with a function decorated by :data:`hookimpl`::

    from proxyalign import hookimpl

    @hookimpl
    def register_criteria(register):
        register(MyCriterion)

and an entry point in the group ``proxyalign.criteria`` pointing at it. The built-in criteria are
registered through this very hook. Tool-call parsers work the same way: ``register_tool_parsers`` and
the group ``proxyalign.tool_parsers`` (docs/tools.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "proxyalign"
ENTRY_POINT_GROUP = "proxyalign.criteria"
TOOL_PARSER_ENTRY_POINT_GROUP = "proxyalign.tool_parsers"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_criteria(register: Callable[[type[Any]], None]) -> None:
    """Call ``register(CriterionClass)`` once per criterion this plugin provides."""


@hookspec
def register_tool_parsers(register: Callable[[type[Any]], None]) -> None:
    """Call ``register(ToolCallParserClass)`` once per tool-call parser this plugin provides."""

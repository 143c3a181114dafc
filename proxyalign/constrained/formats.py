"""OpenAI-shaped output constraints -> one Lark grammar text (llguidance's dialect).

Everything a call can constrain is written as Lark, so the pieces compose: a JSON schema is a
``%json {...}`` rule, a regular expression a ``/.../`` terminal, a forced tool call the parser's own
block format around the call's schema. Accepted ``response_format`` values (OpenAI's shapes, plus
two extensions):

- ``None`` or ``{"type": "text"}``: no constraint;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``: JSON valid for the schema
  (a pydantic model class is accepted as well and turned into its schema);
- ``{"type": "regex", "pattern": "..."}``: text matching a regular expression (Rust ``regex`` syntax);
- ``{"type": "lark", "grammar": "start: ..."}``: a grammar in llguidance's Lark dialect.

JSON is written compactly, the way ``json.dumps`` writes it (``", "`` and ``": "``, no other
whitespace): a model may otherwise spend its tokens on indentation. A schema's own ``x-guidance``
options override this.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from proxyalign.errors import InvalidParameterError

__all__ = [
    "JSON_OPTIONS",
    "RESPONSE_FORMAT_TYPES",
    "json_rule",
    "regex_rule",
    "response_format_lark",
    "response_format_schema",
    "tool_call_schema",
]

RESPONSE_FORMAT_TYPES: tuple[str, ...] = ("text", "json_object", "json_schema", "regex", "lark")
#: llguidance's JSON options: one space after separators, none elsewhere.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ACCEPTED = (
    'None, {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": '
    '{"name": ..., "schema": {...}}}, {"type": "regex", "pattern": ...}, {"type": "lark", "grammar": ...} '
    "or a pydantic model class"
)


def json_rule(schema: Mapping[str, Any]) -> str:
    """The Lark body of a rule matching JSON valid for ``schema`` (compact unless it says otherwise)."""
    options = {**JSON_OPTIONS, **dict(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def regex_rule(pattern: str) -> str:
    """A Lark terminal for a regular expression (its slashes escaped)."""
    return "/" + pattern.replace("\\/", "/").replace("/", "\\/") + "/"


def _pydantic_schema(value: Any) -> dict[str, Any] | None:
    schema = getattr(value, "model_json_schema", None)
    return schema() if isinstance(value, type) and callable(schema) else None


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (``{"type": "object"}`` for json_object), or None
    when it asks for no JSON. Raises :class:`InvalidParameterError` for a malformed value."""
    kind, body = _parse(response_format)
    return body if kind == "json" else None


def response_format_lark(response_format: Any) -> str | None:
    """The Lark *rule body* for a ``response_format``, or None when it does not constrain the output."""
    kind, body = _parse(response_format)
    if kind == "json":
        return json_rule(body)
    if kind == "regex":
        return regex_rule(body)
    if kind == "lark":
        return body
    return None


def _parse(value: Any) -> tuple[str | None, Any]:
    if value is None:
        return None, None
    schema = _pydantic_schema(value)
    if schema is not None:
        return "json", schema
    if not isinstance(value, Mapping) or value.get("type") not in RESPONSE_FORMAT_TYPES:
        raise InvalidParameterError(f"response_format must be one of {_ACCEPTED}; got {value!r}")
    kind = value["type"]
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "json", {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidParameterError(
                'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}; '
                f"got {spec!r}"
            )
        schema = spec.get("schema", {"type": "object"}) if "schema" in spec or "name" in spec else spec
        schema = _pydantic_schema(schema) or schema
        if not isinstance(schema, Mapping):
            raise InvalidParameterError(
                f"response_format json_schema.schema must be a JSON Schema object, got {schema!r}"
            )
        return "json", dict(schema)
    if kind == "regex":
        pattern = value.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise InvalidParameterError(
                f'response_format regex needs "pattern": a non-empty regular expression; got {pattern!r}'
            )
        return "regex", pattern
    grammar = value.get("grammar")
    if not isinstance(grammar, str) or "start" not in grammar:
        raise InvalidParameterError(
            f'response_format lark needs "grammar": Lark text with a start rule; got {grammar!r}'
        )
    return "lark", grammar


def tool_call_schema(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call object ``{"name": ..., "arguments": {...}}`` to any of ``tools``
    (normalised OpenAI tools), or to the one named ``name``. Arguments a tool's schema does not declare
    are refused unless it says ``additionalProperties`` (as OpenAI's strict function calling does)."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = dict(function.get("parameters") or {"type": "object"})
        parameters.setdefault("type", "object")
        parameters.setdefault("additionalProperties", False)  # a call with unknown arguments is an error
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise InvalidParameterError(f"tool_choice names {name!r}, which is not in tools")
    return options[0] if len(options) == 1 else {"anyOf": options}

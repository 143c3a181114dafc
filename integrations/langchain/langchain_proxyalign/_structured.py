"""``with_structured_output`` for the hybrid: the engine constrains the output, LangChain parses it.

Methods (LangChain's names):

- ``json_schema`` (default): ``response_format`` json_schema; every token keeps the output valid JSON
  for the schema, so it parses unless ``max_tokens`` cuts it short.
- ``function_calling``: a call to the schema's tool, forced by ``tool_choice``; its arguments are the
  result.
- ``json_mode``: ``response_format`` json_object: any JSON object (the prompt should ask for the keys);
  parsed, and validated when the schema is a pydantic class.

Unless ``strict=False``, the schema's objects are closed (``additionalProperties: false``, as in
OpenAI's strict mode): a constrained model cannot wander into keys the schema does not name.
"""

from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter
from typing import Any

from langchain_core.output_parsers import BaseOutputParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from proxyalign.errors import InvalidParameterError

__all__ = ["METHODS", "closed", "structured_output"]

METHODS: tuple[str, ...] = ("json_schema", "function_calling", "json_mode")
#: The ``json_schema`` name of a schema without a title (OpenAI requires one; the engine does not read it).
_UNTITLED = "output"


def _is_pydantic(schema: Any) -> bool:
    return isinstance(schema, type) and is_basemodel_subclass(schema)


def _json_schema(schema: Any) -> tuple[str, dict[str, Any]]:
    """The schema's name and its JSON schema; a JSON schema without a title keeps its own shape."""
    if isinstance(schema, Mapping) and "title" not in schema:
        return _UNTITLED, dict(schema)
    try:
        return convert_to_openai_tool(schema)["function"]["name"], convert_to_json_schema(schema)
    except (ValueError, TypeError) as exc:
        raise InvalidParameterError(
            f"schema must be a pydantic class, a TypedDict, or a JSON schema (dict); got {schema!r} ({exc})"
        ) from None


def _tool_name(schema: Any) -> str:
    try:
        return convert_to_openai_tool(schema)["function"]["name"]
    except (ValueError, TypeError) as exc:
        raise InvalidParameterError(
            "schema for method='function_calling' must be a pydantic class, a TypedDict, a function, or a "
            f"JSON schema with a 'title' (the tool's name); got {schema!r} ({exc})"
        ) from None


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties and says
    nothing about others."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if out.get("type") == "object" and isinstance(out.get("properties"), Mapping):
        out.setdefault("additionalProperties", False)
    return out


def _bound(model: Any, schema: Any, method: str, strict: bool | None, trace: dict[str, Any]) -> Runnable:
    """The model bound so that its output is what ``method`` asks for."""
    if method == "json_mode":
        return model.bind(response_format={"type": "json_object"}, ls_structured_output_format=trace)
    if method == "function_calling":  # bind_tools closes the tool's objects unless strict=False
        name = _tool_name(schema)
        return model.bind_tools([schema], tool_choice=name, strict=strict, ls_structured_output_format=trace)
    name, json_schema = _json_schema(schema)
    if strict is not False:
        json_schema = closed(json_schema)
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema}}
    return model.bind(response_format=response_format, ls_structured_output_format=trace)


def _parser(schema: Any, method: str) -> BaseOutputParser:
    if method == "function_calling":
        if _is_pydantic(schema):
            return PydanticToolsParser(tools=[schema], first_tool_only=True)
        return JsonOutputKeyToolsParser(key_name=_tool_name(schema), first_tool_only=True)
    if _is_pydantic(schema):
        return PydanticOutputParser(pydantic_object=schema)
    return JsonOutputParser()


def _with_raw(bound: Runnable, parser: BaseOutputParser) -> Runnable:
    """``{"raw": AIMessage, "parsed": ... or None, "parsing_error": exception or None}``."""
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([failed], exception_key="parsing_error")


def structured_output(
    model: Any, schema: Any, method: str, include_raw: bool, strict: bool | None
) -> Runnable:
    """The runnable ``with_structured_output`` returns (see the module docstring)."""
    if method not in METHODS:
        raise InvalidParameterError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if schema is None and method != "json_mode":
        raise InvalidParameterError(f"method={method!r} needs a schema; only 'json_mode' works without one")
    if strict not in (None, True, False):
        raise InvalidParameterError(f"strict must be True, False or None, got {strict!r}")
    trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
    bound = _bound(model, schema, method, strict, trace)
    parser = _parser(schema, method)
    return _with_raw(bound, parser) if include_raw else bound | parser

"""Structured output by grammar: the reply is decoded under the output class's JSON schema.

LlamaIndex's default for a function-calling LLM is to force a call to a tool built from the output
class. The hybrid can do better: ``response_format`` restricts every model's distribution to tokens that
keep the reply valid JSON for the schema, so the reply *is* the object (no tool prompt, no call
wrapper). LlamaIndex's ``LLMTextCompletionProgram`` does the rest (schema instructions in the prompt,
parsing, partial objects while streaming); this module only adds the constraint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_index.core.bridge.pydantic import BaseModel
from llama_index.core.llms.llm import LLM
from llama_index.core.program.llm_program import LLMTextCompletionProgram
from llama_index.core.prompts import BasePromptTemplate

__all__ = ["json_schema_format", "program", "program_kwargs"]


def json_schema_format(output_cls: type[BaseModel]) -> dict[str, Any]:
    """The ``response_format`` that constrains a reply to ``output_cls``'s JSON schema."""
    schema = output_cls.model_json_schema()
    return {"type": "json_schema", "json_schema": {"name": output_cls.__name__, "schema": schema}}


def program(llm: LLM, output_cls: type[BaseModel], prompt: BasePromptTemplate) -> LLMTextCompletionProgram:
    """LlamaIndex's text program over a copy of ``prompt`` (the program sets the prompt's output parser,
    which must not leak into the caller's template)."""
    return LLMTextCompletionProgram.from_defaults(output_cls=output_cls, prompt=prompt.model_copy(), llm=llm)


def program_kwargs(output_cls: type[BaseModel], llm_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The call's LLM kwargs with the schema constraint (a ``response_format`` of the caller's wins)."""
    return {"response_format": json_schema_format(output_cls), **(llm_kwargs or {})}

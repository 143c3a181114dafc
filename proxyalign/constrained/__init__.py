"""Constrained decoding: OpenAI-shaped output formats compiled into grammars whose token masks the
engine applies to every model's distribution (see docs/criteria.md, "Constrained decoding")."""

from proxyalign.constrained.compiler import Grammar, GrammarCompiler, allowed_bits
from proxyalign.constrained.formats import RESPONSE_FORMAT_TYPES, response_format_schema, tool_call_schema

__all__ = [
    "RESPONSE_FORMAT_TYPES",
    "Grammar",
    "GrammarCompiler",
    "allowed_bits",
    "response_format_schema",
    "tool_call_schema",
]

"""Tool calling: parsing tool calls out of model output, by chat-template family, and rendering tools.

>>> from proxyalign.tools import get_tool_parser
>>> out = get_tool_parser("hermes").parse('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
>>> out.tool_calls[0].name, out.tool_calls[0].parsed_arguments, out.content
('f', {'x': 1}, '')

See docs/tools.md. Parsers are plugins (hook ``register_tool_parsers``, group ``proxyalign.tool_parsers``).
"""

from proxyalign.tools.parsers import (
    BlockError,
    HermesParser,
    PlainTextParser,
    StreamParser,
    TaggedBlockParser,
    ToolCallParser,
)
from proxyalign.tools.registry import (
    get_tool_parser,
    list_tool_parsers,
    parser_for_template,
    parser_for_tokenizer,
    reload_tool_parsers,
)
from proxyalign.tools.render import (
    normalize_messages,
    normalize_tools,
    plain_transcript,
    render_chat,
    render_tools_text,
)
from proxyalign.tools.types import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta, ToolCallIssue

__all__ = [
    "BlockError",
    "HermesParser",
    "ParsedOutput",
    "PlainTextParser",
    "StreamDelta",
    "StreamParser",
    "TaggedBlockParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallIssue",
    "ToolCallParser",
    "get_tool_parser",
    "list_tool_parsers",
    "normalize_messages",
    "normalize_tools",
    "parser_for_template",
    "parser_for_tokenizer",
    "plain_transcript",
    "reload_tool_parsers",
    "render_chat",
    "render_tools_text",
]

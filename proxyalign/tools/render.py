"""Putting tools into a prompt: through a tokenizer's chat template, or as plain text.

:func:`render_chat` renders OpenAI-style messages and tools with the model's own template; it converts
what templates cannot take as it comes (a call's ``arguments`` JSON text becomes an object, since
Qwen2.5-style templates write ``arguments | tojson``; ``content: None`` becomes ``""``).

:func:`render_tools_text` is the plain-text rendering for a model prompted without a template (a base
model). It asks for the ``<tool_call>`` JSON blocks the ``plain`` parser reads::

    # Tools

    You can call these tools:

    get_weather: Get the current weather in a city.
    Parameters (JSON Schema): {"type": "object", "properties": {"city": {"type": "string"}}}

    To call a tool, write one block per call, with the arguments as a JSON object:
    <tool_call>
    {"name": "<tool name>", "arguments": {"<parameter>": <value>}}
    </tool_call>
    Each result comes back in a "Tool:" turn.

:func:`plain_transcript` adds that text to a ``User:/Assistant:`` transcript (proxyalign's ``plain``
prompt format), with calls written as blocks and tool results as ``Tool:`` turns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from proxyalign import prompts
from proxyalign.errors import InvalidParameterError, InvalidPromptError

__all__ = [
    "TOOL_ROLES",
    "normalize_messages",
    "normalize_tools",
    "plain_transcript",
    "render_chat",
    "render_tool_call",
    "render_tools_text",
]

#: Roles a message may have once tools are involved.
TOOL_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

_INSTRUCTIONS = (
    "To call a tool, write one block per call, with the arguments as a JSON object:\n"
    "<tool_call>\n"
    '{"name": "<tool name>", "arguments": {"<parameter>": <value>}}\n'
    "</tool_call>\n"
    'Each result comes back in a "Tool:" turn.'
)


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check an OpenAI ``tools`` list (``{"type": "function", "function": {"name", "description",
    "parameters"}}``) and return plain-dict copies; a mistake names ``tools[i]``."""
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidParameterError(f"tools must be a list of tools, got {type(tools).__name__}")
    checked = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidParameterError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        function = tool.get("function")
        if (
            not isinstance(function, Mapping)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise InvalidParameterError(
                f'tools[{i}] needs "function": {{"name": ..., ...}} with a non-empty name'
            )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidParameterError(
                f"tools[{i}] ({function['name']}): parameters must be a JSON Schema object"
            )
        description = function.get("description", "")
        if not isinstance(description, str):
            raise InvalidParameterError(f"tools[{i}] ({function['name']}): description must be text")
        checked.append({"type": "function", "function": {**function, "parameters": dict(parameters)}})
    return checked


def render_tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The plain-text rendering of a tools list (see the module docstring)."""
    lines = ["# Tools", "", "You can call these tools:", ""]
    for tool in normalize_tools(tools):
        function = tool["function"]
        description = " ".join(function.get("description", "").split())
        lines.append(f"{function['name']}: {description}" if description else function["name"])
        lines.append(f"Parameters (JSON Schema): {json.dumps(function['parameters'], ensure_ascii=False)}")
        lines.append("")
    lines.append(_INSTRUCTIONS)
    return "\n".join(lines)


def render_tool_call(name: str, arguments: Mapping[str, Any] | str) -> str:
    """One call as the block both built-in formats use."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    call = {"name": name, "arguments": arguments}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidPromptError(f"{where}: arguments is not JSON ({exc.msg})") from None
    if not isinstance(value, Mapping):
        raise InvalidPromptError(f"{where}: arguments must be a JSON object")
    return dict(value)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages, checked, as chat templates take them.

    Assistant ``tool_calls`` become ``{"id", "type", "function": {"name", "arguments": dict}}``;
    ``content: None`` becomes ``""``; a tool result that is not text is written as JSON.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence) or not messages:
        raise InvalidPromptError("messages must be a non-empty list of {'role', 'content'} messages")
    normalized = []
    for number, message in enumerate(messages):
        where = f"message {number}"
        if not isinstance(message, Mapping):
            raise InvalidPromptError(f"{where} must be a mapping with 'role' and 'content'")
        role = message.get("role")
        if role not in TOOL_ROLES:
            raise InvalidPromptError(f"{where} has role {role!r}; accepted: {', '.join(TOOL_ROLES)}")
        out = dict(message)
        content = message.get("content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and (calls or role == "assistant"):
            content = ""
        if role == "tool" and not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise InvalidPromptError(f"{where}: content must be text, got {type(content).__name__}")
        out["content"] = content
        if calls:
            out["tool_calls"] = [_call(call, f"{where}, tool_calls[{i}]") for i, call in enumerate(calls)]
        elif "tool_calls" in out:
            del out["tool_calls"]  # an empty list: templates test it for truth, some for presence
        normalized.append(out)
    return normalized


def _call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise InvalidPromptError(f"{where} must be a mapping")
    function = call.get("function", call)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidPromptError(f'{where} needs "function": {{"name", "arguments"}}')
    out = {
        "type": "function",
        "function": {"name": function["name"], "arguments": _arguments(function.get("arguments", {}), where)},
    }
    if call.get("id") is not None:
        out = {"id": call["id"], **out}
    return out


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of ``messages`` (and ``tools``) through ``tokenizer``'s chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidParameterError(
            "the tokenizer has no chat template; use plain_transcript(messages, tools)"
        )
    return tokenizer.apply_chat_template(
        normalize_messages(messages),
        tools=normalize_tools(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def plain_transcript(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """``messages`` and ``tools`` as plain text for a model without a chat template.

    The tools text opens the system turn (its own ``System:`` turn when there is none); an assistant's
    calls follow its text as ``<tool_call>`` blocks; tool results are ``Tool:`` turns. Without tools or
    calls this is exactly proxyalign's ``plain`` format.
    """
    turns: list[dict[str, str]] = []
    for message in normalize_messages(messages):
        content = message["content"]
        blocks = [
            render_tool_call(c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls", [])
        ]
        if blocks:
            content = "\n".join([content, *blocks] if content else blocks)
        turns.append({"role": message["role"], "content": content})
    if tools:
        text = render_tools_text(tools)
        if turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{text}" if turns[0]["content"] else text
        else:
            turns.insert(0, {"role": "system", "content": text})
    return prompts.plain_transcript(turns)

"""Per-model prompt formats: the same request rendered as plain text for one model, chat for another.

The papers' setting gives the large *base* model a plain (often few-shot) prompt and the small
*aligned* model its chat template. Formats: ``"chat"`` applies the tokenizer's chat template (a string
becomes one user message); ``"plain"`` feeds strings as they are and renders chat messages as a plain
``User:/Assistant:`` transcript; ``"auto"`` (default) is plain for strings and chat for messages.

A prompt is a string, a list of chat messages, or a mapping from model role (``"base"``,
``"aligned"``, ``"small_base"``) to either, for per-model text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

from proxyalign.errors import InvalidParameterError, InvalidPromptError
from proxyalign.roles import ALIGNED, BASE, ROLES, SMALL_BASE

__all__ = [
    "CHAT_ROLES",
    "PROMPT_FORMATS",
    "ROLES",
    "Prompt",
    "PromptFormat",
    "check_messages",
    "check_text",
    "encode_prompts",
    "prompt_name",
    "render_prompt",
    "tokenize_prompt",
]

Message: TypeAlias = Mapping[str, Any]
SinglePrompt: TypeAlias = str | Sequence[Message]
Prompt: TypeAlias = SinglePrompt | Mapping[str, SinglePrompt]
PromptFormat = Literal["auto", "plain", "chat"]
PROMPT_FORMATS: tuple[str, ...] = ("auto", "plain", "chat")


def validate_format(role: str, fmt: str) -> str:
    if fmt not in PROMPT_FORMATS:
        raise InvalidParameterError(
            f"prompt format for {role!r} must be one of {', '.join(PROMPT_FORMATS)}; got {fmt!r}"
        )
    return fmt


#: Roles a chat message may have ("tool": a tool's result, answering an assistant's ``tool_calls``).
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def _per_role(item: object) -> bool:
    """A mapping from model roles to prompts (``{"base": ..., "aligned": ...}``), not a message."""
    return isinstance(item, Mapping) and bool(item) and set(item) <= set(ROLES)


def is_messages(prompt: object) -> bool:
    """A non-empty list of mappings that are not per-role prompts: a chat (its messages are checked by
    :func:`check_messages`, so a malformed message gets a message of its own)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str | bytes)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) and not _per_role(m) for m in prompt)
    )


def prompt_name(index: int | None) -> str:
    """How messages refer to a prompt: by its position in a batch, or as "the prompt" when alone."""
    return "the prompt" if index is None else f"prompt {index}"


def check_text(text: str, what: str) -> str:
    """Text that the tokenizer can take: valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPromptError(
            f"{what} is not valid Unicode text ({exc.reason} at character {exc.start}); "
            "decode bytes with errors='replace' or remove the lone surrogate"
        ) from None
    return text


def check_messages(messages: Sequence[Mapping[str, Any]], index: int | None) -> None:
    """Every message has a known ``role`` and text ``content`` (None for an assistant's tool calls)."""
    for number, message in enumerate(messages):
        where = f"{prompt_name(index)}, message {number}"
        missing = [key for key in ("role", "content") if key not in message]
        if message.get("role") == "assistant" and message.get("tool_calls"):
            missing = [key for key in missing if key != "content"]
            if message.get("content") is None:
                continue
        if missing:
            raise InvalidPromptError(f"{where} has no {' or '.join(repr(k) for k in missing)}")
        if message["role"] not in CHAT_ROLES:
            raise InvalidPromptError(
                f"{where} has role {message['role']!r}; accepted: {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise InvalidPromptError(
                f"{where}: content must be text (a string), got {type(message['content']).__name__}"
            )
        check_text(message["content"], f"{where}'s content")


def prompt_for_role(prompt: Prompt, role: str, index: int | None) -> SinglePrompt:
    """The part of ``prompt`` meant for ``role`` (small_base falls back to base's prompt)."""
    if isinstance(prompt, Mapping) and ("role" in prompt or "content" in prompt):
        raise InvalidPromptError(
            f"{prompt_name(index)} is one chat message; give a list of messages, e.g. [{{'role': 'user', "
            "'content': ...}]"
        )
    if isinstance(prompt, Mapping):
        unknown = set(prompt) - set(ROLES)
        if unknown:
            raise InvalidParameterError(
                f"{prompt_name(index)}: unknown model role(s) {sorted(unknown)}; accepted: {', '.join(ROLES)}"
            )
        fallback = (BASE, ALIGNED) if role == SMALL_BASE else (ALIGNED, BASE)
        for key in (role, *fallback):
            if key in prompt:
                return prompt[key]
        raise InvalidParameterError(f"{prompt_name(index)}: no text for model role {role!r}")
    return prompt


def plain_transcript(messages: Sequence[Message]) -> str:
    """Chat messages as plain text for a base model that has no chat template of its own.

    ``User: ...`` / ``Assistant: ...`` turns separated by blank lines, ending with an open
    ``Assistant:`` turn unless the last message is the assistant's (then it is continued).
    """
    turns = [f"{str(m['role']).capitalize()}: {m['content']}" for m in messages]
    if messages[-1]["role"] != "assistant":
        turns.append("Assistant:")
    return "\n\n".join(turns)


def render_prompt(
    prompt: SinglePrompt,
    fmt: str,
    tokenizer: Any,
    index: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[str, bool]:
    """Text to tokenize and whether the tokenizer should still add its special tokens (BOS).

    ``tools`` (normalised OpenAI tools) go through the chat template, or, for a plain prompt, open it
    as :func:`proxyalign.tools.render.render_tools_text` writes them (see docs/tools.md).
    """
    if tools or _has_tool_turns(prompt):
        return _render_with_tools(prompt, fmt, tokenizer, index, tools)
    if isinstance(prompt, bytes | bytearray):
        raise InvalidPromptError(
            f"{prompt_name(index)} is bytes; decode it to text first (e.g. data.decode('utf-8'))"
        )
    if isinstance(prompt, str):
        check_text(prompt, prompt_name(index))
        if not prompt.strip():
            raise InvalidPromptError(f"{prompt_name(index)} is empty; give some text to continue")
        if fmt != "chat":
            return prompt, True
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and not prompt:
        raise InvalidPromptError(f"{prompt_name(index)} is an empty list of messages")
    elif not is_messages(prompt):
        raise InvalidPromptError(
            f"{prompt_name(index)} must be a string, a list of {{'role', 'content'}} messages, or a mapping "
            f"from model role to either; got {type(prompt).__name__}"
        )
    check_messages(prompt, index)
    if fmt == "plain":
        return plain_transcript(prompt), True
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidParameterError(
            f"{prompt_name(index)} is a chat, but the tokenizer has no chat template; pass plain text"
        )
    messages = [dict(m) for m in prompt]
    # A trailing assistant message is a prefix to continue, not a finished turn.
    if messages[-1]["role"] == "assistant":
        options = {"continue_final_message": True}
    else:
        options = {"add_generation_prompt": True}
    text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    return text, False


def _has_tool_turns(prompt: object) -> bool:
    return is_messages(prompt) and any(
        m.get("role") == "tool" or m.get("tool_calls")
        for m in prompt  # type: ignore[union-attr]
    )


def _render_with_tools(
    prompt: SinglePrompt,
    fmt: str,
    tokenizer: Any,
    index: int | None,
    tools: Sequence[Mapping[str, Any]] | None,
) -> tuple[str, bool]:
    """A prompt with tools or tool turns: the template renders both; plain text gets
    :mod:`proxyalign.tools.render`'s transcript (tools text first, calls as blocks, ``Tool:`` turns)."""
    from proxyalign.tools import render  # tools.render builds on this module's plain transcript

    if isinstance(prompt, str):
        check_text(prompt, prompt_name(index))
        if fmt != "chat":
            return (f"{render.render_tools_text(tools)}\n\n{prompt}" if tools else prompt), True
        prompt = [{"role": "user", "content": prompt}]
    try:
        messages = render.normalize_messages(prompt)
    except InvalidPromptError as exc:
        raise InvalidPromptError(f"{prompt_name(index)}: {exc}") from None
    if fmt == "plain":
        return render.plain_transcript(messages, tools), True
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidParameterError(
            f"{prompt_name(index)} is a chat, but the tokenizer has no chat template; pass plain text"
        )
    final = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    options = {"continue_final_message": True} if final else {"add_generation_prompt": True}
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, **options)
    return text, False


def tokenize_prompt(
    prompt: SinglePrompt,
    fmt: str,
    tokenizer: Any,
    index: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of one prompt for one model (``tools``: normalised OpenAI tools to offer it)."""
    text, add_special = render_prompt(prompt, fmt, tokenizer, index, tools)
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if not ids:
        raise InvalidParameterError(f"{prompt_name(index)} tokenizes to no tokens")
    return list(ids)


def encode_prompts(
    batch: Sequence[Prompt],
    formats: Mapping[str, str],
    tokenizer: Any,
    windows: Mapping[str, int | None],
    max_new_tokens: int,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, list[list[int]]]:
    """Each model's token ids for every prompt of a batch (``{role: [ids per prompt]}``, for the roles in
    ``windows``), refusing a prompt that leaves no room for ``max_new_tokens`` in a model's window.
    ``tools`` (normalised OpenAI tools) are offered to every model in its own format.

    Needs only the tokenizer and the windows, so the command line runs it before loading any weights.
    """
    encoded: dict[str, list[list[int]]] = {}
    for role, window in windows.items():
        rows = []
        for position, prompt in enumerate(batch):
            index = position if len(batch) > 1 else None  # one prompt alone is "the prompt"
            own = prompt_for_role(prompt, role, index)
            ids = tokenize_prompt(own, formats[role], tokenizer, index, tools)
            if window is not None and len(ids) + max_new_tokens > window:
                raise InvalidParameterError(
                    f"{prompt_name(index)} has {len(ids)} tokens for the {role} model; with "
                    f"max_new_tokens={max_new_tokens} that exceeds its context window of {window}"
                )
            rows.append(ids)
        encoded[role] = rows
    return encoded

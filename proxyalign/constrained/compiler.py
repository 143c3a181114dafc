"""Compiling output constraints for one tokenizer with llguidance.

Why llguidance (measured in docs/performance.md, "Grammar backends"): on this CPU it compiles a JSON
schema in about 2 ms against xgrammar's tens to hundreds, computes a 151,936-token mask in about a
millisecond, reports a bad grammar as an error value rather than an exception deep in a worker, rolls
back over rejected speculative drafts (``rollback(k)``) and is a 3 MB wheel with no dependencies.

A :class:`GrammarCompiler` belongs to one :class:`~proxyalign.ProxyAligner`; it builds llguidance's view
of the tokenizer once (about 1.5 s for a 150k vocabulary) on the first constrained call. A
:class:`Grammar` is checked here, in the caller's thread, before any model runs: a grammar the library
cannot compile, or one that allows no token at all, raises :class:`~proxyalign.InvalidParameterError`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch
from llguidance.torch import fill_next_token_bitmask

from proxyalign.constrained.formats import json_rule, response_format_lark, tool_call_schema
from proxyalign.errors import InvalidParameterError

__all__ = ["Grammar", "GrammarCompiler", "allowed_bits", "any_allowed"]


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled, checked constraint: every request built with it gets a fresh matcher of its own."""

    source: str  #: llguidance's serialized grammar
    what: str  #: the parameter it came from, for messages ("response_format", "tool_choice")
    tokenizer: llguidance.LLTokenizer

    def matcher(self) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.source, log_level=0)


def allowed_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed ``int32`` mask ``[N, W]`` -> ``bool [N, vocab_size]`` (bit j of word i is
    token ``32 i + j``), on the mask's device: no loop over rows or tokens."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def any_allowed(words: torch.Tensor, vocab_size: int) -> bool:
    """Whether one row's packed mask allows any token id below ``vocab_size`` (on the host, without
    unpacking): a grammar may allow only ids beyond the tokenizer's real vocabulary, which no model emits."""
    full, rest = divmod(vocab_size, 32)
    if bool(words[:full].any()):
        return True
    return bool(rest) and bool(int(words[full]) & ((1 << rest) - 1))


class GrammarCompiler:
    """Builds :class:`Grammar` objects for one tokenizer and vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Collection[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.n_vocab = max(len(tokenizer), vocab_size)
        self.words = (self.n_vocab + 31) // 32
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer, built on first use (once, however many threads ask).

        Grammars need a vocabulary that can spell any text byte by byte (byte-level BPE, SentencePiece
        with byte fallback); a tokenizer llguidance cannot read that way is refused clearly.
        """
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self.hf_tokenizer, n_vocab=self.n_vocab, eos_token=self.eos_ids or None
                    )
                except ValueError as exc:
                    raise InvalidParameterError(
                        "response_format and forced tool_choice need a tokenizer that can spell any text "
                        f"(byte-level BPE or SentencePiece); this one cannot be read as such ({exc})"
                    ) from None
            return self._tokenizer

    def literal(self, text: str) -> str:
        """A Lark literal for ``text``: the special token itself where ``text`` is one added token
        (``<tool_call>`` in Qwen's vocabulary), else the quoted string."""
        ids = self.hf_tokenizer.convert_tokens_to_ids([text])
        added = getattr(self.hf_tokenizer, "added_tokens_decoder", {})
        if ids and isinstance(ids[0], int) and ids[0] in added and str(added[ids[0]]) == text:
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def compile(self, lark: str, what: str) -> Grammar:
        """Check a Lark grammar and return it compiled; a clear error names ``what`` when it fails."""
        source = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(source, self.tokenizer)
        if error:
            raise InvalidParameterError(f"{what} cannot be compiled into a grammar: {error.strip()}")
        grammar = Grammar(source, what, self.tokenizer)
        matcher = grammar.matcher()
        first = torch.zeros((1, self.words), dtype=torch.int32)
        fill_next_token_bitmask(matcher, first, 0)
        if matcher.is_error() or not any_allowed(first[0], self.vocab_size):
            problem = matcher.get_error() if matcher.is_error() else "no token of the vocabulary can start it"
            raise InvalidParameterError(f"{what} allows no output: {problem}")
        return grammar

    def output_grammar(
        self,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | None = None,
        call_block: Callable[[str, Callable[[str], str]], str | None] | None = None,
        parallel_tool_calls: bool = True,
    ) -> Grammar | None:
        """The grammar of a call's output, or None when nothing constrains it.

        ``tools`` are normalised OpenAI tools; ``tool_choice`` is ``"auto"``, ``"none"``, ``"required"``
        or a tool's name; ``call_block(rule, literal)`` is the tool parser's Lark body of one call around
        the JSON call object ``rule``
        (:meth:`~proxyalign.tools.ToolCallParser.call_grammar`). A forced choice constrains the output
        to calls (one call when ``parallel_tool_calls`` is false, else one or more, the last
        optionally followed by a newline); ``"auto"`` with a ``response_format`` allows calls or the
        format's answer.
        """
        answer = response_format_lark(response_format)
        forced = bool(tools) and tool_choice not in (None, "auto", "none")
        calls = None
        if tools and tool_choice != "none" and (forced or answer is not None):
            name = None if tool_choice in ("required", "auto") else tool_choice
            block = call_block("call_json", self.literal) if call_block is not None else None
            if block is None:
                raise InvalidParameterError(
                    f"tool_choice={tool_choice!r} needs a tool-call format that can be constrained; "
                    "the model's tool-call parser has none (see docs/tools.md)"
                )
            newline = json.dumps("\n")
            several = name is None and parallel_tool_calls
            calls = f"call ({newline} call)* {newline}?" if several else f"call {newline}?"
            calls = f"{calls}\ncall: {block}\ncall_json: {json_rule(tool_call_schema(tools, name))}"
        if forced:
            return self.compile(f"start: {calls}", "tool_choice")
        if answer is None:
            return None
        is_lark = isinstance(response_format, Mapping) and response_format.get("type") == "lark"
        if calls is None:
            return self.compile(answer if is_lark else f"start: {answer}", "response_format")
        if is_lark:
            raise InvalidParameterError(
                'response_format {"type": "lark"} cannot be combined with tools; use a json_schema or regex '
                "response_format, or tool_choice='none'"
            )
        return self.compile(f"start: calls | answer\ncalls: {calls}\nanswer: {answer}", "response_format")

"""Constrained decoding: a grammar's mask applied to every model before the criterion, exactly.

The definition (docs/criteria.md, "Constrained decoding"): p, q* and q are each restricted to the tokens
the grammar allows and renormalised; the criterion combines those constrained distributions; the row
samples the result. The reference here computes that independently of the engine: the allowed tokens
from the vocabulary's own texts (a Python regular expression over every token), each model's logits
from ``model(ids)``, and the criterion's target over the allowed tokens only (tests/reference.py).

Models: tiny random ones over a 258-token byte-level vocabulary (``tiny_byte_aligner``) for the
statistical tests, so that thousands of draws are cheap and no cell is narrower than float32 rounding;
tiny ones over the real pair's tokenizer and chat template (``tiny_chat_aligner``: 151,665 tokens,
Hermes tool calls) for JSON and tool calls.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import proxyalign
from proxyalign import InvalidParameterError
from proxyalign.engine.core import Channel
from proxyalign.testing import tiny_byte_aligner, tiny_chat_aligner
from proxyalign.testing.lanes import manual_engine
from tests.reference import assert_checks, check, hybrid_pi

PROMPT = "Pick a number:"
DIGITS = {"type": "regex", "pattern": "[0-3]{3}"}
N = 600


@pytest.fixture(scope="module")
def pa():
    return tiny_byte_aligner(small_base=True)


@pytest.fixture(scope="module")
def chat():
    aligner = tiny_chat_aligner()
    if aligner is None:
        pytest.skip("the real pair's tokenizer is not fetched (make fetch)")
    return aligner


def token_texts(pa) -> list[str]:
    return [pa.tokenizer.decode([i]) for i in range(pa.vocab_size)]


@pytest.fixture(scope="module")
def digits(pa) -> list[int]:
    """Every token whose text could start ``[0-3]{3}``: found from the vocabulary, not from the grammar
    library."""
    found = [i for i, text in enumerate(token_texts(pa)) if re.fullmatch("[0-3]{1,3}", text)]
    assert len(found) == 4, found
    return found


def exact_first_two(pa, criterion, digits: list[int]) -> np.ndarray:
    """P(t1, t2) over (digit, digit) cells: each model's logits at the prompt and after each digit,
    restricted to the digit tokens, combined by the criterion (its target over the allowed tokens)."""
    roles = ["base", "aligned"] + (["small_base"] if criterion.needs_small_base else [])
    prompt = pa._tokenize([PROMPT], roles, 1)
    first, second = {}, {}
    with torch.no_grad():
        for role in roles:
            ids = torch.tensor(prompt[role][0])
            tails = torch.cat([ids.expand(len(digits), -1), torch.tensor(digits).view(-1, 1)], dim=1)
            logits = pa.models[role](tails).logits.double()[:, -2:, digits].numpy()
            first[role], second[role] = logits[0, 0], logits[:, 1]
    pi1 = hybrid_pi(criterion, {r: x[None] for r, x in first.items()})[0]
    pi2 = hybrid_pi(criterion, second)
    return (pi1[:, None] * pi2).flatten()


CASES = [
    ("token", "dual_kad", {"threshold": 0.2}),
    ("token", "confidence_bet", {"margin": 0.1}),
    ("token", "implicit_reward", {}),
    ("speculative", "confidence_bet", {"margin": 0.1}),
    ("speculative", "implicit_reward", {}),
]


@pytest.mark.parametrize(("mode", "name", "params"), CASES)
def test_the_constrained_hybrid_samples_its_target(pa, digits, mode, name, params):
    """First two tokens under ``[0-3]{3}``: token level, and speculative (drafts advance the grammar;
    rejected ones are rolled back, gamma 2 so that both drafts of a round can be rejected). Every
    output is a whole sentence of the grammar."""
    criterion = proxyalign.get_criterion(name, **params)
    gens = pa.generate(
        [PROMPT] * N,
        max_new_tokens=4,
        seed=7,
        criterion=criterion,
        mode=mode,
        gamma=2,
        response_format=DIGITS,
    )
    assert all(re.fullmatch("[0-3]{3}", g.text) and g.finish_reason == "eos" for g in gens), [
        g.text for g in gens if not re.fullmatch("[0-3]{3}", g.text)
    ][:5]
    position = {token: i for i, token in enumerate(digits)}
    cells = [position[g.token_ids[0]] * len(digits) + position[g.token_ids[1]] for g in gens]
    assert_checks([check(np.array(cells), exact_first_two(pa, criterion, digits), f"{mode} {name}")])


@pytest.mark.parametrize("mode", ["token", "speculative"])
def test_a_constrained_row_samples_the_same_alone_and_in_a_mixed_batch(pa, mode):
    """Seeded rows give the same tokens alone and in a batch beside unconstrained rows and rows with
    another grammar: masks are per row, and so is the grammar's state."""
    options = {"max_new_tokens": 24, "seed": 11, "mode": mode, "gamma": 3}
    formats = [DIGITS, {"type": "json_object"}, None]
    alone = [pa.generate([PROMPT] * 3, response_format=f, **options) for f in formats]
    engine = manual_engine(pa)
    channel, done = Channel(), {}
    requests = []
    for k, response_format in enumerate(formats):
        for request in pa.requests([PROMPT] * 3, response_format=response_format, **options):
            requests.append(dataclasses.replace(request, index=3 * k + request.index))
    tickets = engine.submit(requests, channel)
    while not all(t.finished for t in tickets):
        engine.step()
    while (item := channel.get_nowait()) is not None:
        index, event = item
        assert not isinstance(event, BaseException), event
        if event.generation is not None:
            done[index] = event.generation
    for k in range(3):
        for i in range(3):
            assert done[3 * k + i].token_ids == alone[k][i].token_ids, (k, i)
    for g in alone[1]:
        if g.finish_reason == "eos":
            assert isinstance(json.loads(g.text), dict)


def test_json_schema_output_parses_and_fits_the_schema(chat):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for mode in ("token", "speculative"):
        gens = chat.generate(
            [PROMPT] * 6, max_new_tokens=40, seed=3, mode=mode, response_format=response_format
        )
        for g in gens:
            value = json.loads(g.text)
            assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_greedy_rows_stay_inside_the_grammar(pa):
    gens = pa.generate(
        [PROMPT] * 2, max_new_tokens=6, temperature=0, response_format=DIGITS, mode="speculative"
    )
    assert all(re.fullmatch("[0-3]{3}", g.text) for g in gens)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {}}},
]


@pytest.mark.parametrize("mode", ["token", "speculative"])
@pytest.mark.parametrize("choice", ["add", {"type": "function", "function": {"name": "add"}}, "required"])
def test_a_forced_tool_choice_yields_calls_that_fit_their_schema(chat, mode, choice):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    gens = chat.generate(
        [messages] * 4, max_new_tokens=80, seed=5, tools=TOOLS, tool_choice=choice, mode=mode
    )
    for g in gens:
        if g.finish_reason != "eos":
            continue  # a random model may write a long number; the grammar still held (it ended in EOS)
        assert g.tool_calls and not g.tool_call_errors and g.content == ""
        for call in g.tool_calls:
            assert call.name in ("add", "now") if choice == "required" else call.name == "add"
            if call.name == "add":
                assert set(call.parsed_arguments) == {"a", "b"}
                assert all(isinstance(v, int) for v in call.parsed_arguments.values())
            else:
                assert call.parsed_arguments == {}
    assert sum(g.finish_reason == "eos" for g in gens) >= 2


def test_auto_with_a_response_format_answers_in_calls_or_in_the_format(chat):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    gens = chat.generate(
        [messages] * 6, max_new_tokens=60, seed=2, tools=TOOLS, response_format={"type": "json_object"}
    )
    finished = [g for g in gens if g.finish_reason == "eos"]
    assert finished
    for g in finished:
        assert g.tool_calls or isinstance(json.loads(g.text), dict), g.text
    with pytest.raises(InvalidParameterError, match="cannot be combined with tools"):
        chat.generate(PROMPT, tools=TOOLS, response_format={"type": "lark", "grammar": 'start: "a"'})


def test_parallel_tool_calls_false_forces_exactly_one_call(chat):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    gens = chat.generate(
        [messages] * 4,
        max_new_tokens=80,
        seed=9,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert all(len(g.tool_calls) == 1 for g in gens if g.finish_reason == "eos")


def test_streamed_tool_call_pieces_reassemble_into_the_calls(chat):
    messages = [{"role": "user", "content": "Add 2 and 3."}]
    options = {"max_new_tokens": 80, "seed": 5, "tools": TOOLS, "tool_choice": "add"}
    (whole,) = chat.generate([messages], **options)
    calls: dict[int, dict[str, str]] = {}
    content = ""
    for chunk in chat.stream(messages, **options):
        content += chunk.content
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.name or ""
            call["arguments"] += delta.arguments
    assert content == whole.content
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.id, c.name, c.parsed_arguments) for c in whole.tool_calls
    ]


def test_a_tool_conversation_is_rendered_through_the_template(chat):
    """An assistant turn with calls and a tool result render through Qwen's template (Hermes blocks)."""
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    (request,) = chat.requests([messages], tools=TOOLS, max_new_tokens=4)
    text = chat.tokenizer.decode(request.prompt_ids["aligned"])
    assert (
        "<tool_call>" in text and '"name": "add"' in text and "<tool_response>\n5\n</tool_response>" in text
    )
    assert '"description": "Add two integers."' in text
    (plain,) = chat.requests([{"base": "Q: 2+3?", "aligned": messages}], tools=TOOLS, max_new_tokens=4)
    assert chat.tokenizer.decode(plain.prompt_ids["base"]).startswith("# Tools")


BAD = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "strin"),
    ({"type": "regex", "pattern": "(ab"}, "unclosed group"),
    ({"type": "xml"}, "response_format must be one of"),
    ({"type": "regex"}, "pattern"),
    ({"type": "lark", "grammar": "start: <[151700]>"}, "allows no output"),
]


@pytest.mark.parametrize(("response_format", "message"), BAD)
def test_a_bad_grammar_is_refused_before_decoding(chat, response_format, message):
    """Checked in the caller's thread: nothing reaches the engine. (Token 151700 is one of the
    checkpoint's padding ids, beyond the tokenizer's real vocabulary, which no model may emit.)"""
    before = chat.status()["totals"].get("requests", 0)
    with pytest.raises(InvalidParameterError, match="response_format") as info:
        chat.generate(PROMPT, response_format=response_format, max_new_tokens=4)
    assert message in str(info.value)
    assert chat.status()["totals"].get("requests", 0) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tools": TOOLS, "tool_choice": "divide"}, "not in tools"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": 3}, "tool_choice must be one of"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    ],
)
def test_bad_tool_options_are_refused(pa, options, message):
    with pytest.raises(InvalidParameterError) as info:
        pa.generate(PROMPT, max_new_tokens=4, **options)
    assert message in str(info.value)


def test_a_token_the_grammar_refuses_is_a_constraint_error_naming_the_parameter(pa):
    """What fails a row (never the engine) if a refused token ever reached a row's grammar."""
    from proxyalign.engine.constraint import RowConstraint

    row = RowConstraint(pa.grammars.output_grammar(DIGITS))
    error = row.advance([pa.tokenizer.convert_tokens_to_ids("a")])
    assert isinstance(error, proxyalign.errors.ConstraintError) and "response_format" in str(error)


def test_a_tokenizer_that_cannot_spell_any_text_is_refused_clearly():
    """The word-level test tokenizer has no byte tokens: no grammar can be enforced with it."""
    from proxyalign.testing import tiny_aligner

    with pytest.raises(InvalidParameterError, match="tokenizer that can spell any text"):
        tiny_aligner().generate("w5", response_format=DIGITS, max_new_tokens=2)

"""Tool-call parsing (proxyalign.tools): real q* outputs, malformed calls, streaming hold-back, the
parser registry and its plugins, and rendering tools through the real q* chat template.

The real outputs in tests/fixtures/tool_calls were generated once by generate.py there; these tests
only read them (the rendering tests load q*'s tokenizer, not its weights).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyalign import ProxyAlignError, ToolCallError, prompts
from proxyalign.errors import InvalidParameterError, InvalidPromptError
from proxyalign.plugins import DISABLE_ENV
from proxyalign.testing import real_pair_dirs
from proxyalign.tools import (
    ParsedOutput,
    get_tool_parser,
    parser_for_template,
    parser_for_tokenizer,
    plain_transcript,
    reload_tool_parsers,
    render_chat,
    render_tools_text,
)
from proxyalign.tools.parsers import HermesParser, PlainTextParser, ToolCallParser
from proxyalign.tools.registry import ToolParserRegistry, build_tool_parser_registry
from proxyalign.tools.render import normalize_tools, render_tool_call

FIXTURES = Path(__file__).parent / "fixtures" / "tool_calls"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
TOOLS = MANIFEST["tools"]
HERMES = HermesParser()
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def block(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def calls(output: ParsedOutput) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, call.parsed_arguments) for call in output.tool_calls]


def kinds(output: ParsedOutput) -> list[str]:
    return [issue.kind for issue in output.errors]


# -- real q* outputs ------------------------------------------------------------------------------------
# (content, calls, error kinds) as read by hand from each saved output. q* writes well-formed call
# objects but never the <tool_call> tags its template asks for: untagged calls (proxyalign.tools.untagged).
REAL_EXPECTED: dict[str, tuple[str, list[tuple[str, dict[str, Any]]], list[str]]] = {
    # a bare object on one line
    "qwen_weather": ("", [("get_weather", {"city": "Paris", "unit": "celsius"})], []),
    "qwen_calculator": ("", [("calculator", {"expression": "1234 * 5678"})], []),
    # asked for two cities: one pretty-printed call in a ```json fence (Tokyo only)
    "qwen_two_cities": ("", [("get_weather", {"city": "Tokyo", "unit": "celsius"})], []),
    # after the tool result it repeats the call and invents the result: not only calls, so all content
    "qwen_tool_result": (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"temperature_c": 18, "sky": "cloudy"}',
        [],
        [],
    ),
    # prompted plain (plain_transcript with render_tools_text): a bare object after "Assistant:"
    "plain_calculator": ("", [("calculator", {"expression": "17 * 23 + 4"})], []),
}


def real_output(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")


def test_every_saved_output_has_an_expectation() -> None:
    assert set(REAL_EXPECTED) == set(MANIFEST["cases"]) == {p.stem for p in FIXTURES.glob("*.txt")}


@pytest.mark.parametrize("name", sorted(REAL_EXPECTED))
def test_real_outputs_parse(name: str) -> None:
    content, expected_calls, expected_errors = REAL_EXPECTED[name]
    parser = get_tool_parser("plain" if MANIFEST["cases"][name]["format"] == "plain" else "hermes")
    output = parser.parse(real_output(name), tools=TOOLS, seed=0)
    assert output.content == content
    assert calls(output) == expected_calls
    assert kinds(output) == expected_errors
    for call in output.tool_calls:
        assert CALL_ID.fullmatch(call.id)
        assert json.loads(call.arguments) == call.parsed_arguments


# -- hand-written cases ---------------------------------------------------------------------------------
WEATHER_PARIS = block("get_weather", {"city": "Paris"})
CALC = block("calculator", {"expression": "2 * (3 + 4)"})

# label -> (text, content, calls, error kinds)
CASES: dict[str, tuple[str, str, list[tuple[str, dict[str, Any]]], list[str]]] = {
    "one call": (WEATHER_PARIS, "", [("get_weather", {"city": "Paris"})], []),
    "no call": ("Paris is sunny today.", "Paris is sunny today.", [], []),
    "two calls": (
        f"{WEATHER_PARIS}\n{CALC}",
        "",
        [("get_weather", {"city": "Paris"}), ("calculator", {"expression": "2 * (3 + 4)"})],
        [],
    ),
    "text before": (
        f"Let me check.\n\n{WEATHER_PARIS}",
        "Let me check.",
        [("get_weather", {"city": "Paris"})],
        [],
    ),
    "text before and after": (
        f"Checking.\n{WEATHER_PARIS}\nI will report back.",
        "Checking.\nI will report back.",
        [("get_weather", {"city": "Paris"})],
        [],
    ),
    "text after only": (f"{WEATHER_PARIS}\n\nDone.\n", "Done.\n", [("get_weather", {"city": "Paris"})], []),
    "tags on one line": (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>',
        "",
        [("calculator", {"expression": "1+1"})],
        [],
    ),
    "unicode arguments": (
        block("get_weather", {"city": "Zürich"}),
        "",
        [("get_weather", {"city": "Zürich"})],
        [],
    ),
    "parameters instead of arguments": (
        '<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>',
        "",
        [("get_weather", {"city": "Oslo"})],
        [],
    ),
    "double-encoded arguments": (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>',
        "",
        [("get_weather", {"city": "Rome"})],
        [],
    ),
    "no arguments": ('<tool_call>{"name": "calculator"}</tool_call>', "", [("calculator", {})], []),
    "bad json": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        [],
        ["bad_json"],
    ),
    "single quotes": (
        "<tool_call>{'name': 'calculator', 'arguments': {}}</tool_call>",
        "<tool_call>{'name': 'calculator', 'arguments': {}}</tool_call>",
        [],
        ["bad_json"],
    ),
    "empty block": ("<tool_call>\n</tool_call>", "<tool_call>\n</tool_call>", [], ["bad_json"]),
    "array": ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", [], ["bad_json"]),
    "NaN": (
        '<tool_call>{"name": "calculator", "arguments": {"x": NaN}}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"x": NaN}}</tool_call>',
        [],
        ["bad_json"],
    ),
    "missing name": (
        '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',
        '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',
        [],
        ["missing_name"],
    ),
    "name not text": (
        '<tool_call>{"name": 7, "arguments": {}}</tool_call>',
        '<tool_call>{"name": 7, "arguments": {}}</tool_call>',
        [],
        ["missing_name"],
    ),
    "arguments not an object": (
        '<tool_call>{"name": "calculator", "arguments": ["1+1"]}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": ["1+1"]}</tool_call>',
        [],
        ["bad_arguments"],
    ),
    "unknown tool": (
        block("send_email", {"to": "x"}),
        block("send_email", {"to": "x"}),
        [],
        ["unknown_tool"],
    ),
    "unterminated": (
        'Sure. <tool_call>\n{"name": "get_weather", "argu',
        'Sure. <tool_call>\n{"name": "get_weather", "argu',
        [],
        ["unterminated"],
    ),
    "good then unterminated": (
        f"{WEATHER_PARIS}\n<tool_call>\n{{",
        "<tool_call>\n{",
        [("get_weather", {"city": "Paris"})],
        ["unterminated"],
    ),
    "bad between good": (
        f"{WEATHER_PARIS}\n<tool_call>oops</tool_call>\n{CALC}",
        "<tool_call>oops</tool_call>",
        [("get_weather", {"city": "Paris"}), ("calculator", {"expression": "2 * (3 + 4)"})],
        ["bad_json"],
    ),
    "almost a tag": ("a <tool_caller> b <tool", "a <tool_caller> b <tool", [], []),
    "stray closing tag": ("x </tool_call> y", "x </tool_call> y", [], []),
    "only whitespace": (" \n ", " \n ", [], []),
    "untagged": (
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n',
        "",
        [("get_weather", {"city": "Oslo"})],
        [],
    ),
    "untagged, two, fenced": (
        '```json\n{"name": "calculator", "arguments": {"expression": "{[1]}"}}\n'
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```\n',
        "",
        [("calculator", {"expression": "{[1]}"}), ("get_weather", {"city": "Oslo"})],
        [],
    ),
    "untagged, fence left open": (
        '```\n{"name": "calculator", "arguments": {}}',
        "",
        [("calculator", {})],
        [],
    ),
    "untagged, then text": (
        '{"name": "calculator", "arguments": {}} done',
        '{"name": "calculator", "arguments": {}} done',
        [],
        [],
    ),
    "untagged, unknown tool": (
        '{"name": "send_email", "arguments": {}}',
        '{"name": "send_email", "arguments": {}}',
        [],
        [],
    ),
    "untagged, other keys": (
        '{"name": "calculator", "arguments": {}, "id": 1}',
        '{"name": "calculator", "arguments": {}, "id": 1}',
        [],
        [],
    ),
    "untagged, no arguments key": ('{"name": "calculator"}', '{"name": "calculator"}', [], []),
    "untagged, then a block": (
        '{"name": "calculator", "arguments": {}}\n' + WEATHER_PARIS,
        '{"name": "calculator", "arguments": {}}',
        [("get_weather", {"city": "Paris"})],
        [],
    ),
    "a JSON answer": ('{"answer": 42}', '{"answer": 42}', [], []),
    "a python fence": ("```python\nprint({1: 2})\n```", "```python\nprint({1: 2})\n```", [], []),
    "close tag in a string": (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "</tool_call>"}}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"expression": "</tool_call>"}}</tool_call>',
        [],
        ["bad_json"],
    ),
}


@pytest.mark.parametrize("label", list(CASES))
def test_hand_written_cases(label: str) -> None:
    text, content, expected_calls, expected_errors = CASES[label]
    output = HERMES.parse(text, tools=TOOLS, seed=1)
    assert output.content == content
    assert calls(output) == expected_calls
    assert kinds(output) == expected_errors
    for issue in output.errors:
        assert issue.text in text and issue.text.startswith("<tool_call>")


def test_issue_messages_say_which_call_where_and_why() -> None:
    text = f"{WEATHER_PARIS}\n" + '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>'
    (issue,) = HERMES.parse(text).errors
    assert issue.message == 'tool call 2 (character 81): "arguments" must be a JSON object, got an array'
    (issue,) = HERMES.parse(block("send_email", {}), tools=["get_weather", "calculator"]).errors
    assert "unknown tool 'send_email'; available: calculator, get_weather" in issue.message
    (issue,) = HERMES.parse("<tool_call>{").errors
    assert issue.message == "tool call 1 (character 0): no closing </tool_call>"


def test_without_a_tool_list_any_name_is_accepted() -> None:
    assert calls(HERMES.parse(block("send_email", {"to": "x"}))) == [("send_email", {"to": "x"})]
    assert kinds(HERMES.parse(block("send_email", {}), tools=[])) == ["unknown_tool"]


def test_untagged_calls_need_a_tool_list() -> None:
    text = '{"name": "calculator", "arguments": {"expression": "1"}}'
    assert calls(HERMES.parse(text, tools=["calculator"])) == [("calculator", {"expression": "1"})]
    output = HERMES.parse(text)
    assert (output.content, output.tool_calls, output.errors) == (text, [], [])

    class TagsOnly(HermesParser):
        untagged_calls = False

    assert TagsOnly().parse(text, tools=["calculator"]).content == text


def test_strict_raises_tool_call_error_naming_every_problem() -> None:
    text = "<tool_call>{bad}</tool_call> <tool_call>{}</tool_call>"
    with pytest.raises(
        ToolCallError, match=r"2 malformed tool call\(s\) \(hermes\): tool call 1 .*tool call 2"
    ):
        HERMES.parse(text, strict=True)
    assert issubclass(ToolCallError, ProxyAlignError) and issubclass(ToolCallError, ValueError)
    assert calls(HERMES.parse(WEATHER_PARIS, strict=True)) == [("get_weather", {"city": "Paris"})]


def test_call_ids_are_random_or_seeded() -> None:
    text = f"{WEATHER_PARIS}{CALC}"
    first = [c.id for c in HERMES.parse(text, seed=7).tool_calls]
    assert first == [c.id for c in HERMES.parse(text, seed=7).tool_calls]
    assert first != [c.id for c in HERMES.parse(text, seed=8).tool_calls]
    unseeded = [c.id for c in HERMES.parse(text).tool_calls] + [c.id for c in HERMES.parse(text).tool_calls]
    assert len(set(first)) == 2 and len(set(unseeded)) == 4
    assert all(CALL_ID.fullmatch(i) for i in first + unseeded)


def test_openai_shapes() -> None:
    output = HERMES.parse(f"Checking.\n{WEATHER_PARIS}", seed=0)
    (call,) = output.tool_calls
    assert call.arguments == '{"city": "Paris"}'
    assert output.to_message() == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert HERMES.parse(WEATHER_PARIS).to_message()["content"] is None
    assert HERMES.parse("hi").to_message() == {"role": "assistant", "content": "hi"}


# -- streaming ------------------------------------------------------------------------------------------
def stream(text: str, pieces: list[int], parser: ToolCallParser = HERMES, **options: Any) -> ParsedOutput:
    """Feed ``text`` in pieces of the given sizes and rebuild the output from the deltas alone, the way
    an OpenAI streaming client does."""
    sp = parser.stream(**options)
    content, errors, rebuilt = [], [], {}
    at = 0
    deltas = []
    for size in pieces:
        deltas.append(sp.feed(text[at : at + size]))
        at += size
    assert at == len(text)
    deltas.append(sp.finish())
    for delta in deltas:
        content.append(delta.content)
        errors.extend(delta.errors)
        for piece in delta.tool_calls:
            if piece.index not in rebuilt:
                assert piece.index == len(rebuilt) and piece.id is not None and piece.name is not None
                rebuilt[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            else:
                assert piece.id is None and piece.name is None  # name once
            rebuilt[piece.index]["arguments"] += piece.arguments
    final = sp.output
    assert [(c.id, c.name, c.arguments) for c in final.tool_calls] == [
        (r["id"], r["name"], r["arguments"]) for r in rebuilt.values()
    ]
    assert "".join(content) == final.content and errors == final.errors
    return final


def chunkings(length: int, rng: random.Random, count: int = 60) -> Iterator[list[int]]:
    """Every fixed size 1..7 at every phase, then ``count`` random chunkings of sizes 1..7."""
    for size in range(1, 8):
        for phase in range(min(size, length + 1)):
            head = [phase] if phase else []
            rest = length - phase
            yield [*head, *[size] * (rest // size), *([rest % size] if rest % size else [])]
    for _ in range(count):
        pieces, left = [], length
        while left:
            pieces.append(min(left, rng.randint(1, 7)))
            left -= pieces[-1]
        yield pieces


STREAM_TEXTS = {**{f"case: {k}": v[0] for k, v in CASES.items()}}
STREAM_TEXTS.update({f"real: {name}": real_output(name) for name in MANIFEST["cases"]})


@pytest.mark.parametrize("label", list(STREAM_TEXTS))
def test_any_chunking_streams_what_parse_returns(label: str) -> None:
    text = STREAM_TEXTS[label]
    whole = HERMES.parse(text, tools=TOOLS, seed=3)
    rng = random.Random(label)
    for pieces in chunkings(len(text), rng):
        got = stream(text, pieces, tools=TOOLS, seed=3)
        assert (got.content, got.tool_calls, got.errors) == (whole.content, whole.tool_calls, whole.errors), (
            pieces
        )


THREE_PIECE = [
    "case: text before and after",
    "case: bad between good",
    "case: unterminated",
    "case: untagged, then a block",
    "real: qwen_two_cities",
    "real: qwen_tool_result",
]


@pytest.mark.parametrize("label", THREE_PIECE)
def test_every_three_piece_split_streams_what_parse_returns(label: str) -> None:
    text = STREAM_TEXTS[label]
    whole = HERMES.parse(text, tools=TOOLS, seed=3)
    for a, b in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        got = stream(text, [a, b - a, len(text) - b], tools=TOOLS, seed=3)
        assert (got.content, got.tool_calls, got.errors) == (whole.content, whole.tool_calls, whole.errors)


def test_a_possible_tag_start_is_held_back_until_decided() -> None:
    sp = HERMES.stream(seed=0)
    assert sp.feed("Let me look <").content == "Let me look"  # " <" might begin a block
    assert sp.feed("tool_").content == ""
    assert sp.feed("box> up.").content == " <tool_box> up."  # decided: not a tag
    assert sp.feed(" <tool_call>\n{").content == ""
    held = sp.feed('"name": "get_weather", "arguments": {"city": "Paris"}}\n')
    assert not held  # a call is released only when its block is complete and well formed
    done = sp.feed("</tool_call>")
    (delta,) = done.tool_calls
    assert (delta.index, delta.name, delta.arguments) == (0, "get_weather", '{"city": "Paris"}')
    assert delta.to_openai() == {
        "index": 0,
        "id": delta.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert sp.feed("\n").content == ""  # whitespace after a block waits for what follows
    assert sp.finish().content == ""
    assert sp.output.content == "Let me look <tool_box> up."
    with pytest.raises(RuntimeError, match="after finish"):
        sp.feed("more")


def test_untagged_candidates_are_held_only_while_they_may_be_calls() -> None:
    sp = HERMES.stream(tools=TOOLS)
    assert sp.feed("```py").content == "```py"  # not a ```json fence: released at once
    sp = HERMES.stream(tools=TOOLS)
    assert sp.feed('```json\n{"answer": ').content == ""
    assert sp.feed("42}").content == '```json\n{"answer": 42}'  # a complete object that is no call
    sp = HERMES.stream(tools=TOOLS)
    assert sp.feed('{"name": "calculator", "arguments": {}}').content == ""
    assert sp.feed("\n").content == ""
    final = sp.finish()  # only at the end is it known that nothing else follows
    assert final.content == "" and [d.name for d in final.tool_calls] == ["calculator"]
    sp = HERMES.stream()  # no tool list: nothing is held for this
    assert sp.feed('{"name": "calculator"').content == '{"name": "calculator"'


def test_unterminated_block_is_released_as_content_at_finish() -> None:
    sp = HERMES.stream()
    assert sp.feed("Hi <tool_call>{").content == "Hi"
    final = sp.finish()
    assert final.content == " <tool_call>{" and [i.kind for i in final.errors] == ["unterminated"]


# -- registry and plugins -------------------------------------------------------------------------------
PLUGIN_MODULES = {
    "pa_tp_bracket": '''
        """A working plugin: [TOOL]{json}[/TOOL] blocks, for templates that mention [TOOL]."""
        from proxyalign import hookimpl
        from proxyalign.tools import TaggedBlockParser

        class BracketParser(TaggedBlockParser):
            family = "bracket"
            description = "[TOOL] JSON [/TOOL] blocks"
            open_tag, close_tag = "[TOOL]", "[/TOOL]"

            @classmethod
            def detect(cls, chat_template):
                return "[TOOL]" in chat_template

        @hookimpl
        def register_tool_parsers(register):
            register(BracketParser)
    ''',
    "pa_tp_broken": "import no_such_module_for_tool_parsers\n",
    "pa_tp_raising": """
        from proxyalign import hookimpl

        @hookimpl
        def register_tool_parsers(register):
            raise RuntimeError("plugin exploded")
    """,
    "pa_tp_misspelled": """
        from proxyalign import hookimpl

        @hookimpl
        def register_tool_parser(register):
            pass
    """,
    "pa_tp_collision": """
        from proxyalign import hookimpl
        from proxyalign.tools import HermesParser

        class FakeHermes(HermesParser):
            family = "hermes"

        class NotAParser:
            family = "nope"

        class BadDetect(HermesParser):
            family = "bad_detect"

            @classmethod
            def detect(cls, chat_template):
                raise ValueError("detect broke")

        @hookimpl
        def register_tool_parsers(register):
            register(FakeHermes)
            register(BadDetect)
            register(NotAParser)
    """,
}
PLUGIN_DISTRIBUTIONS = {  # distribution -> (version, {entry point: module})
    "pa-tp-good": ("1.2.3", {"bracket": "pa_tp_bracket"}),
    "pa-tp-faults": (
        "0.0.1",
        {
            "broken": "pa_tp_broken",
            "raising": "pa_tp_raising",
            "misspelled": "pa_tp_misspelled",
            "collision": "pa_tp_collision",
        },
    ),
}


def _forget_plugin_modules() -> None:
    for module in [m for m in sys.modules if m.startswith("pa_tp_")]:
        del sys.modules[module]


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ToolParserRegistry]:
    """Installed distributions (a .dist-info with entry points, modules beside it) on sys.path."""
    for module, source in PLUGIN_MODULES.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    for dist, (version, entry_points) in PLUGIN_DISTRIBUTIONS.items():
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"{name} = {module}" for name, module in entry_points.items()]
        (info / "entry_points.txt").write_text("[proxyalign.tool_parsers]\n" + "\n".join(lines) + "\n")
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget_plugin_modules()
    yield reload_tool_parsers()
    monkeypatch.undo()
    _forget_plugin_modules()
    reload_tool_parsers()


def test_builtins_are_registered_through_the_hook() -> None:
    registry = build_tool_parser_registry(load_entry_points=False)
    assert [i.qualified_name for i in registry.parsers()] == ["proxyalign:hermes", "proxyalign:plain"]
    assert registry.failures == []
    assert isinstance(get_tool_parser("hermes"), HermesParser)
    assert isinstance(get_tool_parser("proxyalign:plain"), PlainTextParser)
    with pytest.raises(
        InvalidParameterError, match=r"unknown tool-call parser 'mistral'; available: .*hermes"
    ):
        get_tool_parser("mistral")


def test_template_selects_the_parser_and_the_fallback_is_plain() -> None:
    assert parser_for_template("... <tool_call> ...").family == "hermes"
    assert parser_for_template("{{ messages }}").family == "plain"
    assert parser_for_template(None).family == "plain"
    assert parser_for_tokenizer(object()).family == "plain"


def test_plugin_parser_is_found_and_used(plugins: ToolParserRegistry) -> None:
    info = plugins.lookup("bracket")
    assert (info.package, info.version, info.plugin) == ("pa-tp-good", "1.2.3", "pa-tp-good:bracket")
    parser = get_tool_parser("bracket")
    output = parser.parse('ok [TOOL]{"name": "calculator", "arguments": {"expression": "1"}}[/TOOL]')
    assert output.content == "ok" and calls(output) == [("calculator", {"expression": "1"})]
    assert parser_for_template("system [TOOL] ...").family == "bracket"
    with pytest.warns(RuntimeWarning, match=r"pa-tp-faults:bad_detect 0.0.1: detect\(\) raised ValueError"):
        assert parser_for_template("a template no parser knows").family == "plain"
    assert parser_for_template("<tool_call>").family == "hermes"  # built-ins are asked first


def test_broken_plugins_are_reported_and_the_rest_still_load(plugins: ToolParserRegistry) -> None:
    failures = {f.plugin: f for f in plugins.failures}
    assert set(failures) == {
        "pa-tp-faults:broken",
        "pa-tp-faults:misspelled",
        "pa-tp-faults:raising",
        "pa-tp-faults:collision",
    }
    assert all(f.package == "pa-tp-faults" and f.version == "0.0.1" for f in failures.values())
    assert "ModuleNotFoundError" in failures["pa-tp-faults:broken"].error
    assert "register_tool_parser" in failures["pa-tp-faults:misspelled"].error
    assert "the hook is named 'register_tool_parsers'" in failures["pa-tp-faults:misspelled"].error
    assert "RuntimeError: plugin exploded" in failures["pa-tp-faults:raising"].error
    assert "expects a ToolCallParser subclass" in failures["pa-tp-faults:collision"].error
    assert {"proxyalign:hermes", "proxyalign:plain", "pa-tp-good:bracket"} <= set(plugins.by_qualified_name)
    # a collision: the built-in keeps the bare name, the plugin's stays reachable by qualified name
    assert [i.qualified_name for i in plugins.collisions["hermes"]] == [
        "proxyalign:hermes",
        "pa-tp-faults:hermes",
    ]
    assert type(get_tool_parser("hermes")) is HermesParser
    assert type(get_tool_parser("pa-tp-faults:hermes")).__name__ == "FakeHermes"
    assert calls(get_tool_parser("hermes").parse(WEATHER_PARIS)) == [("get_weather", {"city": "Paris"})]


def test_disable_plugins_loads_only_builtins(
    plugins: ToolParserRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    registry = reload_tool_parsers()
    assert set(registry.by_qualified_name) == {"proxyalign:hermes", "proxyalign:plain"}
    assert registry.failures == []


def test_criteria_registry_ignores_tool_parser_plugins(plugins: ToolParserRegistry) -> None:
    from proxyalign.plugins import build_registry

    registry = build_registry()
    assert not [f for f in registry.failures if f.package.startswith("pa-tp-")]
    assert "dual_kad" in registry.by_name


# -- rendering ------------------------------------------------------------------------------------------
def test_plain_tools_rendering_is_the_documented_text() -> None:
    assert render_tools_text([TOOLS[1]]) == (
        "# Tools\n\nYou can call these tools:\n\n"
        "calculator: Evaluate an arithmetic expression and return the result.\n"
        'Parameters (JSON Schema): {"type": "object", "properties": {"expression": {"type": "string", '
        '"description": "e.g. 2 * (3 + 4)"}}, "required": ["expression"]}\n\n'
        "To call a tool, write one block per call, with the arguments as a JSON object:\n"
        "<tool_call>\n"
        '{"name": "<tool name>", "arguments": {"<parameter>": <value>}}\n'
        "</tool_call>\n"
        'Each result comes back in a "Tool:" turn.'
    )


def test_plain_transcript_with_calls_and_results() -> None:
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    assert plain_transcript(chat) == prompts.plain_transcript(chat)  # no tools: proxyalign's plain format
    history = [
        {"role": "system", "content": "Be brief."},
        *chat,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": {"temperature_c": 18}},
    ]
    text = plain_transcript(history, TOOLS)
    assert text.startswith("System: Be brief.\n\n# Tools\n\nYou can call these tools:\n\nget_weather: ")
    result = '{"temperature_c": 18}'
    assert text.endswith(
        f"User: Weather in Paris?\n\nAssistant: {WEATHER_PARIS}\n\nTool: {result}\n\nAssistant:"
    )
    assert calls(get_tool_parser("plain").parse(text.split("Assistant: ")[1])) == [
        ("get_weather", {"city": "Paris"})
    ]


def test_render_tool_call_round_trips() -> None:
    rendered = render_tool_call("get_weather", '{"city": "Zürich", "unit": "celsius"}')
    assert calls(HERMES.parse(rendered)) == [("get_weather", {"city": "Zürich", "unit": "celsius"})]


@pytest.mark.parametrize(
    ("tools", "fragment"),
    [
        ({"type": "function"}, "tools must be a list"),
        ([{"type": "retrieval"}], "tools[0] must be"),
        ([TOOLS[0], {"type": "function", "function": {"description": "x"}}], "tools[1] needs"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0] (f): parameters"),
    ],
)
def test_bad_tools_are_refused_by_name(tools: Any, fragment: str) -> None:
    with pytest.raises(InvalidParameterError, match=re.escape(fragment)):
        normalize_tools(tools)


def test_bad_messages_are_refused_by_name() -> None:
    with pytest.raises(InvalidPromptError, match="message 1 has role 'robot'"):
        plain_transcript([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    bad_call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
    }
    with pytest.raises(InvalidPromptError, match=r"message 0, tool_calls\[0\]: arguments is not JSON"):
        plain_transcript([bad_call])


@pytest.fixture(scope="module")
def q_star_tokenizer() -> Any:
    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        pytest.skip("real pair not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs[1])


@pytest.mark.real_weights
def test_q_star_template_renders_tools(q_star_tokenizer: Any) -> None:
    assert parser_for_tokenizer(q_star_tokenizer).family == "hermes"
    text = render_chat(q_star_tokenizer, [{"role": "user", "content": "Weather in Paris?"}], TOOLS)
    assert "<tools>" in text and '"name": "get_weather"' in text and '"name": "calculator"' in text
    assert "<tool_call>" in text and text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    without = render_chat(q_star_tokenizer, [{"role": "user", "content": "Hi"}])
    assert "<tools>" not in without


@pytest.mark.real_weights
def test_q_star_template_renders_calls_and_tool_messages(q_star_tokenizer: Any) -> None:
    output = HERMES.parse(
        f"Checking both.\n{WEATHER_PARIS}\n{block('get_weather', {'city': 'Oslo'})}", seed=0
    )
    history = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        output.to_message(),  # arguments as JSON text, as an OpenAI client sends them back
        {"role": "tool", "tool_call_id": output.tool_calls[0].id, "content": '{"temperature_c": 18}'},
        {"role": "tool", "tool_call_id": output.tool_calls[1].id, "content": '{"temperature_c": 4}'},
    ]
    text = render_chat(q_star_tokenizer, history, TOOLS)
    assert (
        "<|im_start|>assistant\nChecking both.\n"
        f"{WEATHER_PARIS}\n{block('get_weather', {'city': 'Oslo'})}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature_c": 18}\n</tool_response>\n'
        '<tool_response>\n{"temperature_c": 4}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    ) in text
    assert '"{\\"city' not in text  # arguments not double-encoded
    # the assistant turn the template wrote parses back to the same calls
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert calls(HERMES.parse(turn)) == calls(output)


@pytest.mark.real_weights
def test_q_star_keeps_tool_call_tags_when_decoding(q_star_tokenizer: Any) -> None:
    """The engine decodes with skip_special_tokens=True; the tags are added tokens but not special."""
    ids = q_star_tokenizer(WEATHER_PARIS, add_special_tokens=False)["input_ids"]
    assert q_star_tokenizer.convert_tokens_to_ids("<tool_call>") in ids
    assert q_star_tokenizer.decode(ids, skip_special_tokens=True) == WEATHER_PARIS

"""The tool-call parsers on answers as Qwen (hermes) and Llama 3.x write them, whole, split in two at
every position and a character at a time: every way gives the same content and calls; and the
reasoning parser in front of them (pipeline.ChoiceParser). Calls stream piece by piece (their name,
then their arguments' text), and the pieces of any split join to the whole answer's calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdserve.config import ServerConfig
from pdserve.errors import InvalidRequestError
from pdserve.server import protocol as p
from pdserve.server.parsers.pipeline import TOOL_CALL_PARSERS, ChoiceParser, Parsed, ParserSpec
from pdserve.server.parsers.requested import parser_spec
from pdserve.server.parsers.tool_calls import CallPiece, ParsedCall, assemble

WEATHER = ParsedCall("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
TIME = ParsedCall("get_time", json.dumps({"tz": "Europe/Paris"}))

# recorded shapes: Qwen2.5-7B-Instruct with two tools, Qwen3 after its reasoning, Llama-3.1-8B
HERMES_TWO = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)
HERMES_TEXT_FIRST = (
    'Let me check that.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)
HERMES_BAD_JSON = "<tool_call>\n{not json}\n</tool_call> rest"
FORCED_TIME = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
HERMES_CUT = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'  # max_tokens
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
LLAMA_TWO = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; ' + (
    '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}'
)
QWEN3_THINK_THEN_CALL = (
    "<think>\nI need the time.\n</think>\n\n"
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)

Want = tuple[str, str, list[ParsedCall]]  # reasoning, content, calls


def want(reasoning: str, content: str, calls: list[ParsedCall]) -> Want:
    return reasoning, content, calls


CASES = [
    (ParserSpec(tool_parser="hermes", tool_mode="auto"), HERMES_TWO, want("", "", [WEATHER, TIME])),
    (
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        HERMES_TEXT_FIRST,
        want("", "Let me check that.\n", [TIME]),
    ),
    (ParserSpec(tool_parser="hermes", tool_mode="auto"), HERMES_BAD_JSON, want("", HERMES_BAD_JSON, [])),
    (ParserSpec(tool_parser="hermes", tool_mode="auto"), HERMES_CUT, want("", "", [TIME])),
    (
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        "No tools: a < b.",
        want("", "No tools: a < b.", []),
    ),
    (ParserSpec(tool_parser="llama3_json", tool_mode="auto"), LLAMA, want("", "", [WEATHER])),
    (ParserSpec(tool_parser="llama3_json", tool_mode="auto"), LLAMA_TWO, want("", "", [WEATHER, TIME])),
    (
        ParserSpec(tool_parser="llama3_json", tool_mode="auto"),
        "Paris is sunny.",
        want("", "Paris is sunny.", []),
    ),
    (
        ParserSpec(tool_parser="llama3_json", tool_mode="auto"),
        '{"a": 1} not a call',
        want("", '{"a": 1} not a call', []),
    ),
    (
        ParserSpec(reasoning="qwen3", tool_parser="hermes", tool_mode="auto"),
        QWEN3_THINK_THEN_CALL,
        want("\nI need the time.\n", "", [TIME]),
    ),
    # required / named: tool_call_grammar constrains the output to hermes blocks (the hermes parser)
    (ParserSpec(tool_parser="hermes", tool_mode="required"), HERMES_TWO, want("", "", [WEATHER, TIME])),
    (
        ParserSpec(tool_parser="hermes", tool_mode="function", function="get_time"),
        FORCED_TIME,
        want("", "", [TIME]),
    ),
    (
        ParserSpec(tool_parser="hermes", tool_mode="function", function="get_time"),
        FORCED_TIME[:30],  # cut by max_tokens inside the JSON: no call, the text stays content
        want("", FORCED_TIME[:30], []),
    ),
]


def parsed(spec: ParserSpec, pieces: list[str]) -> Parsed:
    parser = ChoiceParser(spec)
    total = Parsed()
    for piece in pieces:
        total.add(parser.feed(piece))
    return total.add(parser.finish())


def parse(spec: ParserSpec, pieces: list[str]) -> Want:
    total = parsed(spec, pieces)
    return total.reasoning, total.content, total.calls


@pytest.mark.parametrize(("spec", "text", "expected"), CASES)
def test_split_anywhere_gives_the_same_calls(spec: ParserSpec, text: str, expected: Want) -> None:
    assert parse(spec, [text]) == expected
    assert parse(spec, list(text)) == expected
    for i in range(len(text) + 1):
        assert parse(spec, [text[:i], text[i:]]) == expected, i


def test_a_call_streams_its_name_then_its_arguments() -> None:
    """vLLM's way: the name as soon as it is read (the arguments' first brace with it), then the
    arguments' text as it comes, the object's own closing brace and the tag never part of them."""
    parser = ChoiceParser(ParserSpec(tool_parser="hermes", tool_mode="auto"))
    head = HERMES_TWO.index('{"city"')
    assert parser.feed(HERMES_TWO[:head]) == Parsed()  # the arguments' first character not yet read
    assert parser.feed(HERMES_TWO[head : head + 5]) == Parsed(
        pieces=[CallPiece(name="get_weather"), CallPiece(arguments='{"cit')]
    )
    end = HERMES_TWO.index("}}") + 1
    assert parser.feed(HERMES_TWO[head + 5 : end + 1]).pieces == [
        CallPiece(arguments=HERMES_TWO[head + 5 : end])
    ]
    second = parser.feed(HERMES_TWO[end + 1 :])
    assert second.calls == [TIME] and second.pieces[0] == CallPiece(name="get_time")
    assert parser.finish() == Parsed()


STREAMED = [
    ("hermes", HERMES_TWO, [WEATHER, TIME]),
    ("hermes", HERMES_TEXT_FIRST, [TIME]),
    ("llama3_json", LLAMA_TWO, [WEATHER, TIME]),
    ("llama3_json", " " + LLAMA, [WEATHER]),
]


@pytest.mark.parametrize(("name", "text", "calls"), STREAMED)
def test_streamed_pieces_start_each_call_once_and_join_to_the_whole_call(
    name: str, text: str, calls: list[ParsedCall]
) -> None:
    """Split at every position and a character at a time: each call starts once (its name, no
    arguments yet) and its arguments' pieces join to the whole answer's; read a character at a time,
    the arguments come in many pieces, each call's first before the next call begins."""
    spec = ParserSpec(tool_parser=name, tool_mode="auto")
    for pieces in ([text[:i], text[i:]] for i in range(len(text) + 1)):
        got = parsed(spec, pieces)
        assert got.calls == calls and [p.name for p in got.pieces if p.name] == [c.name for c in calls]
    one_by_one = parsed(spec, list(text)).pieces
    assert assemble(one_by_one) == calls
    starts = [i for i, p in enumerate(one_by_one) if p.name is not None]
    assert len(starts) == len(calls) and all(one_by_one[i].arguments == "" for i in starts)
    fragments = [p.arguments for p in one_by_one if p.name is None]
    assert fragments == list("".join(c.arguments for c in calls)), "the arguments did not stream"


def test_primed_parser_knows_the_calls_its_client_has() -> None:
    """A resumed stream primes its parsers with the text its client has had: the calls begun there
    keep their indexes (the next call's is calls_given), and the rest of a call goes on."""
    spec = ParserSpec(tool_parser="hermes", tool_mode="auto")
    cut = HERMES_TWO.index("Europe")
    parser = ChoiceParser(spec)
    before = parser.feed(HERMES_TWO[:cut])
    assert parser.calls_given == 2 and [c.name for c in before.calls] == ["get_weather", "get_time"]
    rest = parser.feed(HERMES_TWO[cut:]).add(parser.finish())
    assert rest.pieces == [CallPiece(arguments=TIME.arguments[TIME.arguments.index("Europe") :])]
    one = ChoiceParser(ParserSpec(tool_parser="hermes", tool_mode="auto", parallel_tool_calls=False))
    one.feed(HERMES_TWO[:cut])
    assert one.calls_given == 1


def test_llama3_json_calls_then_text_drop_the_text() -> None:
    """Once a call has streamed, it cannot be taken back: text after it that is no call is dropped."""
    spec = ParserSpec(tool_parser="llama3_json", tool_mode="auto")
    text = LLAMA + " and that is all"
    for i in range(len(text) + 1):
        assert parse(spec, [text[:i], text[i:]]) == ("", "", [WEATHER]), i


def test_arguments_are_json_text_of_an_object() -> None:
    out = parsed(
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        ['<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'],
    )
    assert out.calls == [ParsedCall("f", '{"x": 1}')]  # arguments given as a JSON string: the same
    out = parsed(
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        ['<tool_call>{"name": "f", "arguments": [1]}</tool_call>'],
    )
    assert out.calls == [] and out.content.startswith("<tool_call>")


def test_registry_names() -> None:
    assert set(TOOL_CALL_PARSERS) == {"hermes", "llama3_json"}


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    spec = ParserSpec(tool_parser="hermes", tool_mode="auto", parallel_tool_calls=False)
    assert parse(spec, [HERMES_TWO]) == ("", "", [WEATHER])
    assert parse(spec, list(HERMES_TWO)) == ("", "", [WEATHER])


def _spec(config: ServerConfig, **fields: Any) -> ParserSpec:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parser_spec(p.ChatCompletionRequest.model_validate(body), config)


def test_what_tools_and_tool_choice_mean() -> None:
    tool = {"type": "function", "function": {"name": "get_time"}}
    plain = ServerConfig(reasoning_parser="qwen3")
    auto = ServerConfig(reasoning_parser="qwen3", enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert _spec(plain) == ParserSpec("qwen3")
    assert _spec(plain, tools=[tool], tool_choice="none") == ParserSpec("qwen3")
    assert _spec(auto, tools=[tool]) == ParserSpec("qwen3", "hermes", "auto")
    assert _spec(auto, tools=[tool], parallel_tool_calls=False).parallel_tool_calls is False
    # forced calls may come after the reasoning (the grammar allows the think block first)
    assert _spec(plain, tools=[tool], tool_choice="required") == ParserSpec("qwen3", "hermes", "required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert _spec(plain, tools=[tool], tool_choice=named) == ParserSpec(
        "qwen3", "hermes", "function", "get_time", parallel_tool_calls=False
    )
    for config, fields in (
        (plain, {"tools": [tool]}),  # auto needs --enable-auto-tool-choice
        (auto, {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "other"}}}),
        (auto, {"tool_choice": "required"}),  # no tools
    ):
        with pytest.raises(InvalidRequestError) as e:
            _spec(config, **fields)
        assert e.value.param == "tool_choice"

"""The tool-call parsers on answers as Qwen (hermes) and Llama 3.x write them, whole, split in two at
every position and a character at a time: every way gives the same content and calls; and the
reasoning parser in front of them (pipeline.ChoiceParser)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdserve.config import ServerConfig
from pdserve.errors import InvalidRequestError
from pdserve.server import protocol as p
from pdserve.server.parsers.pipeline import TOOL_CALL_PARSERS, ChoiceParser, Parsed, ParserSpec
from pdserve.server.parsers.requested import parser_spec
from pdserve.server.parsers.tool_calls import ParsedCall

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

CASES = [
    (ParserSpec(tool_parser="hermes", tool_mode="auto"), HERMES_TWO, Parsed("", "", [WEATHER, TIME])),
    (
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        HERMES_TEXT_FIRST,
        Parsed("", "Let me check that.\n", [TIME]),
    ),
    (ParserSpec(tool_parser="hermes", tool_mode="auto"), HERMES_BAD_JSON, Parsed("", HERMES_BAD_JSON, [])),
    (ParserSpec(tool_parser="hermes", tool_mode="auto"), HERMES_CUT, Parsed("", "", [TIME])),
    (
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        "No tools: a < b.",
        Parsed("", "No tools: a < b.", []),
    ),
    (ParserSpec(tool_parser="llama3_json", tool_mode="auto"), LLAMA, Parsed("", "", [WEATHER])),
    (ParserSpec(tool_parser="llama3_json", tool_mode="auto"), LLAMA_TWO, Parsed("", "", [WEATHER, TIME])),
    (
        ParserSpec(tool_parser="llama3_json", tool_mode="auto"),
        "Paris is sunny.",
        Parsed("", "Paris is sunny.", []),
    ),
    (
        ParserSpec(tool_parser="llama3_json", tool_mode="auto"),
        '{"a": 1} not a call',
        Parsed("", '{"a": 1} not a call', []),
    ),
    (
        ParserSpec(reasoning="qwen3", tool_parser="hermes", tool_mode="auto"),
        QWEN3_THINK_THEN_CALL,
        Parsed("\nI need the time.\n", "", [TIME]),
    ),
    # required / named: tool_call_grammar constrains the output to hermes blocks (the hermes parser)
    (ParserSpec(tool_parser="hermes", tool_mode="required"), HERMES_TWO, Parsed("", "", [WEATHER, TIME])),
    (
        ParserSpec(tool_parser="hermes", tool_mode="function", function="get_time"),
        FORCED_TIME,
        Parsed("", "", [TIME]),
    ),
    (
        ParserSpec(tool_parser="hermes", tool_mode="function", function="get_time"),
        FORCED_TIME[:30],  # cut by max_tokens inside the JSON: no call, the text stays content
        Parsed("", FORCED_TIME[:30], []),
    ),
]


def parse(spec: ParserSpec, pieces: list[str]) -> Parsed:
    parser = ChoiceParser(spec)
    total = Parsed()
    for piece in pieces:
        total.add(parser.feed(piece))
    return total.add(parser.finish())


@pytest.mark.parametrize(("spec", "text", "expected"), CASES)
def test_split_anywhere_gives_the_same_calls(spec: ParserSpec, text: str, expected: Parsed) -> None:
    assert parse(spec, [text]) == expected
    assert parse(spec, list(text)) == expected
    for i in range(len(text) + 1):
        assert parse(spec, [text[:i], text[i:]]) == expected, i


def test_hermes_gives_each_call_once_closed() -> None:
    parser = ChoiceParser(ParserSpec(tool_parser="hermes", tool_mode="auto"))
    first_close = HERMES_TWO.index("</tool_call>") + len("</tool_call>")
    assert parser.feed(HERMES_TWO[: first_close - 1]) == Parsed()
    assert parser.feed(HERMES_TWO[first_close - 1 : first_close]).calls == [WEATHER]
    assert parser.feed(HERMES_TWO[first_close:]).calls == [TIME]
    assert parser.finish() == Parsed()


def test_arguments_are_json_text_of_an_object() -> None:
    out = parse(
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        ['<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'],
    )
    assert out.calls == [ParsedCall("f", '{"x": 1}')]  # arguments given as a JSON string: the same
    out = parse(
        ParserSpec(tool_parser="hermes", tool_mode="auto"),
        ['<tool_call>{"name": "f", "arguments": [1]}</tool_call>'],
    )
    assert out.calls == [] and out.content.startswith("<tool_call>")


def test_registry_names() -> None:
    assert set(TOOL_CALL_PARSERS) == {"hermes", "llama3_json"}


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    spec = ParserSpec(tool_parser="hermes", tool_mode="auto", parallel_tool_calls=False)
    assert parse(spec, [HERMES_TWO]) == Parsed("", "", [WEATHER])
    assert parse(spec, list(HERMES_TWO)) == Parsed("", "", [WEATHER])


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
    assert _spec(plain, tools=[tool], tool_choice="required") == ParserSpec(None, "hermes", "required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert _spec(plain, tools=[tool], tool_choice=named) == ParserSpec(
        None, "hermes", "function", "get_time", parallel_tool_calls=False
    )
    for config, fields in (
        (plain, {"tools": [tool]}),  # auto needs --enable-auto-tool-choice
        (auto, {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "other"}}}),
        (auto, {"tool_choice": "required"}),  # no tools
    ):
        with pytest.raises(InvalidRequestError) as e:
            _spec(config, **fields)
        assert e.value.param == "tool_choice"

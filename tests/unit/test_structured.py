"""pdserve/structured with the default model's real tokenizer (no model): specs, compiling and its
cache, masks, matchers advancing, the tool-call grammar, and the edges that carry a spec (the HTTP
fields, SamplingParams, a peer's Reserve)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pytest
import torch

from pdserve.disagg.schemas import SCHEMAS
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.server import protocol as p
from pdserve.server.structured_request import structured_spec
from pdserve.structured import GrammarSpec, tool_call_grammar
from pdserve.structured.compiler import Grammars
from pdserve.structured.masks import apply_bitmask

EOS = 2  # SmolLM2's <|im_end|>, the model's EOS
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "color": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "integer"}},
        "home": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "color", "home"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},  # no parameters: any object
]


@pytest.fixture(scope="module")
def grammars(tokenizer: Any) -> Grammars:
    return Grammars(tokenizer, len(tokenizer), [EOS])


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def accepts(grammars: Grammars, tokenizer: Any, spec: GrammarSpec, text: str) -> bool:
    """Whether the grammar takes `text` token by token and may end right after it (EOS allowed)."""
    m = grammars.matcher(spec)
    return m.replay(ids(tokenizer, text)) and m.accept(EOS) and not m.constrains


def allowed(grammars: Grammars, spec: GrammarSpec, replay: list[int] = ()) -> set[int]:  # type: ignore[assignment]
    m = grammars.matcher(spec)
    assert m.replay(replay)
    bitmask = torch.zeros((1, (grammars.vocab_size + 31) // 32), dtype=torch.int32)
    m.fill(bitmask, 0)
    logits = torch.zeros((1, grammars.vocab_size))
    apply_bitmask(logits, [0], bitmask)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_each_kind_compiles_and_matches(grammars: Grammars, tokenizer: Any) -> None:
    schema = GrammarSpec("json_schema", json.dumps(SCHEMA))
    good = '{"name": "Ada", "color": "red", "tags": [1, 2], "home": {"city": "Paris"}}'
    assert accepts(grammars, tokenizer, schema, good)
    assert not accepts(grammars, tokenizer, schema, '{"name": "Ada", "color": "blue", "home": {"city": "P"}}')
    assert not accepts(grammars, tokenizer, schema, '{"name": "Ada", "color": "red"}')  # home required
    assert accepts(grammars, tokenizer, GrammarSpec("json_object"), '{"a": [1, {"b": null}]}')
    regex = GrammarSpec("regex", r"[0-9]{3}-[a-z]+")
    assert accepts(grammars, tokenizer, regex, "123-abc")
    assert not accepts(grammars, tokenizer, regex, "12-abc")
    choice = GrammarSpec("choice", json.dumps(["yes", "no", 'say "hi"\n']))
    assert accepts(grammars, tokenizer, choice, 'say "hi"\n')  # escaped as EBNF reads it
    assert not accepts(grammars, tokenizer, choice, "maybe")
    ebnf = GrammarSpec("grammar", 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]+')
    assert accepts(grammars, tokenizer, ebnf, "(1+22+3)")
    assert not accepts(grammars, tokenizer, ebnf, "(1+)")


def test_compile_cache_and_errors(grammars: Grammars) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    assert grammars.compile(spec) is grammars.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    bad = [
        GrammarSpec("json_schema", '{"type": 12}'),
        GrammarSpec("json_schema", "{not json"),
        GrammarSpec("regex", "(("),
        GrammarSpec("grammar", "root ::= undefined_rule"),
        GrammarSpec("choice", "[]"),
        GrammarSpec("choice", '"yes"'),
    ]
    for spec in bad:
        with pytest.raises(InvalidRequestError) as e:
            grammars.compile(spec)
        assert e.value.param == "structured" and "[" not in str(e.value)[:1], str(e.value)


def test_masks_allow_only_what_the_grammar_does_and_eos_only_at_its_end(
    grammars: Grammars, tokenizer: Any
) -> None:
    choice = GrammarSpec("choice", json.dumps(["yes", "no"]))
    first = allowed(grammars, choice)
    assert first and EOS not in first
    assert all(tokenizer.decode([t]) in ("y", "ye", "yes", "n", "no") for t in first), first
    assert allowed(grammars, choice, ids(tokenizer, "yes")) == {EOS}  # done: only EOS
    # a row past the grammar's vocabulary (the model's padded logits) is never allowed
    bitmask = torch.full((1, 2), -1, dtype=torch.int32)  # 64 tokens allowed
    logits = torch.zeros((2, 70))
    apply_bitmask(logits, [1], bitmask)
    assert torch.isinf(logits[1, 64:]).all() and not torch.isinf(logits[1, :64]).any()
    assert not torch.isinf(logits[0]).any()  # a free row is left alone


def test_matcher_advances_refuses_without_moving_and_stops_constraining(
    grammars: Grammars, tokenizer: Any
) -> None:
    m = grammars.matcher(GrammarSpec("regex", "ab"))
    a, b = ids(tokenizer, "a")[0], ids(tokenizer, "b")[0]
    assert not m.accept(b) and m.num_accepted == 0  # refused, and the matcher stays put
    assert m.accept(a) and m.accept(b) and m.constrains
    assert m.accept(EOS) and not m.constrains  # ended: nothing more is constrained
    assert m.accept(a)  # (ignore_eos goes on freely)


def test_tool_call_grammar_required_named_and_parallel(grammars: Grammars, tokenizer: Any) -> None:
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    required = tool_call_grammar(TOOLS, "required")
    assert required.kind == "tool_calls"
    assert accepts(grammars, tokenizer, required, one)
    assert accepts(grammars, tokenizer, required, two)
    assert not accepts(grammars, tokenizer, required, "")  # at least one call
    assert not accepts(grammars, tokenizer, required, "Sure! " + one)  # nothing else
    bad_args = '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c"}}\n</tool_call>'
    assert not accepts(grammars, tokenizer, required, bad_args)  # city is required
    unknown = '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>'
    assert not accepts(grammars, tokenizer, required, unknown)
    assert not accepts(grammars, tokenizer, tool_call_grammar(TOOLS, "required", parallel=False), two)
    named = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert accepts(grammars, tokenizer, named, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert not accepts(grammars, tokenizer, named, one)
    assert named == tool_call_grammar(TOOLS, "now")
    for tools, mode in (
        ([], "required"),
        (TOOLS, "missing"),
        (TOOLS, 7),
        ([{"type": "function"}], "required"),
    ):
        with pytest.raises(InvalidRequestError):
            tool_call_grammar(tools, mode)


def test_tool_call_grammar_after_reasoning(grammars: Grammars, tokenizer: Any) -> None:
    """With a reasoning parser the calls may follow the model's reasoning: qwen3's think block is
    optional, deepseek_r1's answer opens inside it and must close it; nothing else comes first."""
    one = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    thought = "<think>\nI need the time.\n</think>\n\n"
    opened = "I need the time.\n</think>\n\n"  # the prompt opened the block
    qwen3, r1 = (tool_call_grammar(TOOLS, "now", reasoning=r) for r in ("qwen3", "deepseek_r1"))
    assert not accepts(grammars, tokenizer, tool_call_grammar(TOOLS, "now"), thought + one)
    assert accepts(grammars, tokenizer, qwen3, thought + one) and accepts(grammars, tokenizer, qwen3, one)
    assert not accepts(grammars, tokenizer, qwen3, opened + one)
    assert accepts(grammars, tokenizer, r1, opened + one) and accepts(grammars, tokenizer, r1, thought + one)
    assert not accepts(grammars, tokenizer, r1, one)
    for spec in (qwen3, r1):
        assert not accepts(grammars, tokenizer, spec, "<think>a</think>b</think>" + one)
        assert not accepts(grammars, tokenizer, spec, "<think>a</think>Sure! " + one)
        assert not accepts(grammars, tokenizer, spec, thought)  # the calls must come
    with pytest.raises(InvalidRequestError):
        tool_call_grammar(TOOLS, "now", reasoning="other")


def test_spec_validation_and_its_wire_form() -> None:
    spec = GrammarSpec("regex", "a+")
    params = SamplingParams(structured=spec)
    assert SamplingParams(**asdict(params)).structured == spec  # a Reserve's params, decoded
    assert SamplingParams(**json.loads(json.dumps(asdict(params)))).structured == spec
    for wrong in ({"kind": "sql", "spec": "x"}, {"kind": "regex", "spec": 3}, {"kind": "regex"}, "a+", [1]):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(structured=wrong)  # type: ignore[arg-type]
        assert e.value.param == "structured"
    with pytest.raises(InvalidRequestError):
        GrammarSpec("json_schema", "x" * (1 << 18 + 1))
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured=spec, min_tokens=2, max_tokens=8)
    assert e.value.param == "min_tokens"


def test_reserve_schema_checks_structured() -> None:
    ok, _ = SCHEMAS["Reserve"]["params"]
    assert ok(asdict(SamplingParams(structured=GrammarSpec("regex", "a+"))))
    assert ok(asdict(SamplingParams()))
    assert not ok({"structured": {"kind": "regex", "spec": 5}})
    assert not ok({"structured": {"kind": "regex", "spec": "a", "extra": 1}})
    assert not ok({"structured": {"kind": "regex", "spec": "a" * (1 << 19)}})
    assert not ok({"structured": "regex"})


def _chat(**fields: Any) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_http_fields_map_to_one_spec() -> None:
    schema_text = json.dumps(SCHEMA)
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    cases = {
        "response_format": (json_schema, GrammarSpec("json_schema", schema_text)),
        "guided_json": (SCHEMA, GrammarSpec("json_schema", schema_text)),
        "guided_regex": ("a+", GrammarSpec("regex", "a+")),
        "guided_choice": (["x", "y"], GrammarSpec("choice", '["x", "y"]')),
        "guided_grammar": ('root ::= "a"', GrammarSpec("grammar", 'root ::= "a"')),
        "structured_outputs": ({"regex": "a+"}, GrammarSpec("regex", "a+")),
    }
    for name, (value, spec) in cases.items():
        assert structured_spec(_chat(**{name: value})) == spec, name
    assert structured_spec(_chat(guided_json=schema_text)) == GrammarSpec("json_schema", schema_text)
    assert structured_spec(_chat(response_format={"type": "json_object"})) == GrammarSpec("json_object")
    assert structured_spec(_chat(structured_outputs={"json_object": True})) == GrammarSpec("json_object")
    assert structured_spec(_chat(structured_outputs={"choice": ["a"]})) == GrammarSpec("choice", '["a"]')
    assert structured_spec(_chat(response_format={"type": "text"})) is None
    assert structured_spec(_chat()) is None
    refused = {
        "response_format.type": {"response_format": {"type": "yaml"}},
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "structured_outputs": {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        "guided_choice": {"guided_choice": []},
        "guided_regex": {"guided_json": SCHEMA, "guided_regex": "a"},
    }
    for param, fields in refused.items():
        with pytest.raises(InvalidRequestError) as e:
            structured_spec(_chat(**fields))
        assert e.value.param == param, (param, e.value.param)
    with pytest.raises(InvalidRequestError) as e:
        structured_spec(_chat(structured_outputs={"whitespace_pattern": " "}))
    assert "structured_outputs.whitespace_pattern" in str(e.value)
    with pytest.raises(InvalidRequestError):  # two ways at once
        structured_spec(_chat(response_format={"type": "json_object"}, guided_regex="a"))

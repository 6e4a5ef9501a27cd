"""tool_call_grammar: the grammar for tool_choice "required" or a named function, in the hermes form
the Qwen chat templates (and api27's hermes parser) use:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one call, or several separated by a newline when parallel calls are allowed; nothing else, then EOS.
Each call is a JSON object whose "name" is one of the allowed functions and whose "arguments" match
that function's parameters schema, so the arguments always parse and validate. A named function
gets the same tags (one call), so one parser reads both.

With a reasoning parser (the server's --reasoning-parser), the calls may come after the model's
reasoning, as vLLM lets a reasoning model think before its constrained output:

    qwen3        [<think> any text </think>] calls       (Qwen3 opens the block itself, or not at all)
    deepseek_r1  [<think>] any text </think> calls       (QwQ's and R1's templates end the prompt
                                                          inside the block: the answer must close it)

with up to four newlines or spaces after </think>. The reasoning is free text (no </think> inside).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pdserve.errors import InvalidRequestError
from pdserve.structured.spec import GrammarSpec

BEGIN, END, SEPARATOR = "<tool_call>\n", "\n</tool_call>", "\n"
THINK_START, THINK_END = "<think>", "</think>"
_AFTER_THINKING = {"type": "regex", "pattern": "[ \\n]{0,4}"}


def tool_call_grammar(
    tools: Sequence[Any], mode: Any, parallel: bool = True, reasoning: str | None = None
) -> GrammarSpec:
    """tools: the request's tools (OpenAI's {"type": "function", "function": {...}} dicts or pydantic
    models of them). mode: "required", or the named function (its name, or tool_choice's
    {"type": "function", "function": {"name": ...}}). parallel: parallel_tool_calls. reasoning: the
    server's reasoning parser (qwen3, deepseek_r1), whose reasoning may come before the calls."""
    functions = [_function(t) for t in tools]
    if not functions:
        raise InvalidRequestError("tool_choice needs at least one tool", "tools")
    name = _named(mode)
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise InvalidRequestError(
                f"tool_choice names {name!r}, which is not among the tools", "tool_choice"
            )
        parallel = False
    schema = (
        {"anyOf": [_call_schema(f) for f in functions]} if len(functions) > 1 else _call_schema(functions[0])
    )
    tag = {
        "type": "tag",
        "begin": BEGIN,
        "content": {"type": "json_schema", "json_schema": schema},
        "end": END,
    }
    fmt: dict[str, Any] = {
        "type": "tags_with_separator",
        "tags": [tag],
        "separator": SEPARATOR,
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
    if reasoning is not None:
        fmt = {"type": "sequence", "elements": [_thinking(reasoning), fmt]}
    return GrammarSpec("tool_calls", json.dumps({"type": "structural_tag", "format": fmt}))


def _thinking(reasoning: str) -> dict[str, Any]:
    """The reasoning block the calls may (qwen3) or must (deepseek_r1: opened by the prompt) follow."""
    text = {"type": "any_text", "excludes": [THINK_END]}
    if reasoning == "qwen3":
        block = {"type": "tag", "begin": THINK_START, "content": text, "end": THINK_END}
        return {"type": "optional", "content": {"type": "sequence", "elements": [block, _AFTER_THINKING]}}
    if reasoning == "deepseek_r1":
        start = {"type": "optional", "content": {"type": "const_string", "value": THINK_START}}
        block = {"type": "tag", "begin": "", "content": text, "end": THINK_END}
        return {"type": "sequence", "elements": [start, block, _AFTER_THINKING]}
    raise InvalidRequestError(f"unknown reasoning parser {reasoning!r}", "tool_choice")


def _function(tool: Any) -> dict[str, Any]:
    """{"name", "parameters"} of one tool, whatever shape it came in."""
    if hasattr(tool, "model_dump"):
        tool = tool.model_dump(exclude_none=True)
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequestError(
            'each tool must be {"type": "function", "function": {"name": ...}}', "tools"
        )
    params = fn.get("parameters") or {"type": "object"}
    if not isinstance(params, Mapping):
        raise InvalidRequestError(
            f"the parameters of tool {fn['name']!r} must be a JSON schema object", "tools"
        )
    return {"name": fn["name"], "parameters": dict(params)}


def _named(mode: Any) -> str | None:
    if hasattr(mode, "model_dump"):
        mode = mode.model_dump(exclude_none=True)
    if mode == "required":
        return None
    if isinstance(mode, str) and mode:
        return mode
    fn = mode.get("function") if isinstance(mode, Mapping) else None
    if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
        return str(fn["name"])
    raise InvalidRequestError('tool_choice must be "required" or name a function', "tool_choice")


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }

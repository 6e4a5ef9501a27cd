"""The answer of a request whose tool_choice is `required` or names a function: its output is
constrained (pdserve.structured's tool_call_grammar) to JSON, read here at the end, as vLLM reads it:

    required        [{"name": "f", "parameters": {...}}, ...]   (an object alone is taken too)
    named function  {...}: the arguments of that function

JSON that is not that shape (the output cut short by max_tokens) stays content.
"""

from __future__ import annotations

import json

from pdserve.server.parsers.tool_calls import MAX_CALLS, ParsedCall, ToolSplit, call_of


class ForcedParser:
    def __init__(self, function: str | None) -> None:
        self.function = function  # None: required (any of the tools)
        self.text = ""

    def feed(self, text: str) -> ToolSplit:
        self.text += text
        return ToolSplit()

    def finish(self) -> ToolSplit:
        text, self.text = self.text, ""
        calls = self._calls(text)
        return ToolSplit(calls=calls) if calls else ToolSplit(content=text)

    def _calls(self, text: str) -> list[ParsedCall] | None:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if self.function is not None:
            return (
                [ParsedCall(self.function, json.dumps(value, ensure_ascii=False))]
                if isinstance(value, dict)
                else None
            )
        values = value if isinstance(value, list) else [value]
        calls = [call_of(v) for v in values[: MAX_CALLS + 1]]
        if not calls or len(calls) > MAX_CALLS or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]

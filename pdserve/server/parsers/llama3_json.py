"""Llama 3.x JSON tool calls: the answer is the call(s) themselves,

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

(the tag only where special tokens are kept). An answer that opens with `{` (after whitespace and
the tag) is held until its end and then read as calls; if it is not all calls, it is content as it
was. Any other answer is content, streamed as it comes.
"""

from __future__ import annotations

from pdserve.server.parsers.tool_calls import MAX_CALLS, ToolSplit, call_of, json_values

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser:
    def __init__(self) -> None:
        self.state = "opening"  # -> calls (held to the end) | content
        self.held = ""

    def feed(self, text: str) -> ToolSplit:
        if self.state == "content":
            return ToolSplit(content=text)
        self.held += text
        if self.state == "opening":
            rest = self.held.lstrip()
            if rest.startswith(PYTHON_TAG):
                rest = rest[len(PYTHON_TAG) :].lstrip()
            if rest.startswith("{"):
                self.state = "calls"
            elif rest and not PYTHON_TAG.startswith(rest):
                self.state = "content"
                held, self.held = self.held, ""
                return ToolSplit(content=held)
        return ToolSplit()

    def finish(self) -> ToolSplit:
        held, self.held = self.held, ""
        if self.state != "calls":
            return ToolSplit(content=held)
        body = held.lstrip()
        body = body[len(PYTHON_TAG) :] if body.startswith(PYTHON_TAG) else body
        values = json_values(body)
        calls = [call_of(v, ("parameters", "arguments")) for v in values or ()]
        if not calls or len(calls) > MAX_CALLS or any(c is None for c in calls):
            return ToolSplit(content=held)
        return ToolSplit(calls=[c for c in calls if c is not None])

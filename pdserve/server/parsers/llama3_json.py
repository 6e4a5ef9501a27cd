"""Llama 3.x JSON tool calls: the answer is the call(s) themselves,

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

(the tag only where special tokens are kept). An answer that opens with `{` (after whitespace and
the tag) is read as calls, each streaming as it is written (call_stream.py), separated by whitespace or
`;`. If its first object is no call, the answer is content as it was, streamed from then on; once a
call has been given out, what follows that is not a call is dropped. Any other answer is content,
streamed as it comes.
"""

from __future__ import annotations

from pdserve.server.parsers.call_stream import CallScanner, JsonDepth
from pdserve.server.parsers.tool_calls import MAX_CALLS, ToolSplit

PYTHON_TAG = "<|python_tag|>"
_KEYS = ("parameters", "arguments")


class Llama3JsonParser:
    def __init__(self) -> None:
        self.state = "opening"  # -> calls -> (dropped) | content
        self.held = ""  # the answer so far, while it may still turn out to be content
        self.body = ""  # the calls' text (after the tag)
        self.read = 0  # how much of `body` has been read
        self.fed = 0  # where in `body` the current object's text not yet given to its scanner starts
        self.current: CallScanner | None = None
        self.depth = JsonDepth()
        self.calls = 0

    def feed(self, text: str) -> ToolSplit:
        if self.state == "content":
            return ToolSplit(content=text)
        if self.state == "dropped":
            return ToolSplit()
        self.held += text
        if self.state == "opening":
            return self._opening()
        self.body += text
        return self._calls()

    def _opening(self) -> ToolSplit:
        rest = self.held.lstrip()
        if rest.startswith(PYTHON_TAG):
            rest = rest[len(PYTHON_TAG) :].lstrip()
        if rest.startswith("{"):
            self.state = "calls"
            self.body = rest
            return self._calls()
        if rest and not PYTHON_TAG.startswith(rest):
            return self._content()
        return ToolSplit()

    def _calls(self) -> ToolSplit:
        out = ToolSplit()
        while self.read < len(self.body) and self.state == "calls":
            c = self.body[self.read]
            self.read += 1
            if self.current is None:
                if c == "{" and self.calls < MAX_CALLS:
                    self.current, self.fed, self.depth = CallScanner(_KEYS), self.read - 1, JsonDepth()
                    self.depth.step(c)
                elif not (c.isspace() or c == ";"):
                    return out.add(self._not_calls())
            elif self.depth.step(c) == 0:
                out.add(self._object_done())
        if self.current is not None and self.state == "calls":
            out.pieces += self.current.feed(self.body[self.fed : self.read])
            self.fed = self.read
        return out

    def _object_done(self) -> ToolSplit:
        assert self.current is not None
        scanner, self.current = self.current, None
        pieces = scanner.feed(self.body[self.fed : self.read])
        closing = scanner.close()
        if closing is None:
            return self._not_calls()
        self.calls += 1
        return ToolSplit(pieces=pieces + closing)

    def _not_calls(self) -> ToolSplit:
        """Text that is no call: all content if no call was given out yet, else the rest is dropped."""
        if self.calls:
            self.state = "dropped"
            return ToolSplit()
        return self._content()

    def _content(self) -> ToolSplit:
        self.state = "content"
        held, self.held = self.held, ""
        return ToolSplit(content=held)

    def finish(self) -> ToolSplit:
        if self.state in ("content", "dropped"):
            return ToolSplit()
        if self.state == "opening" or (self.current is not None and not self.current.started):
            return self._not_calls()  # whitespace, or an object that never became a call
        return ToolSplit()

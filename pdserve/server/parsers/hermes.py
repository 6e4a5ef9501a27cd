"""Hermes-style tool calls (Qwen2.5, Qwen3, QwQ templates):

    some text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>...</tool_call>

Text before the first call is content; a call streams as it is written (call_stream.py: its name,
then its arguments piece by piece), or, written another way, is given out whole once its closing tag
arrives (or at the end, if the answer stops inside one); after the first call, text between calls is
dropped, as vLLM does. A block whose JSON is not a call stays content, tags and all.
"""

from __future__ import annotations

from pdserve.server.parsers.call_stream import CallScanner
from pdserve.server.parsers.held import partial_tag_start, split_at_tag
from pdserve.server.parsers.tool_calls import MAX_CALLS, ToolSplit

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser:
    def __init__(self) -> None:
        self.in_call = False
        self.held = ""  # outside a call: a maybe-tag; inside: the call's text so far
        self.calls = 0
        self.searched = 0  # inside a call: where in `held` the closing tag may start
        self.scanner = CallScanner()
        self.scanned = 0  # inside a call: how much of `held` the scanner has had

    def feed(self, text: str) -> ToolSplit:
        out = ToolSplit()
        text = self.held + text
        self.held = ""
        while text:
            text = self._call(text, out) if self.in_call else self._outside(text, out)
        return out

    def finish(self) -> ToolSplit:
        held, self.held = self.held, ""
        if not self.in_call:
            return ToolSplit(content="" if self.calls else held)
        self.in_call = False
        return self._close(held)

    def _outside(self, text: str, out: ToolSplit) -> str:
        before, after, held = split_at_tag(text, OPEN)
        if not self.calls:
            out.content += before
        if after is None:
            self.held = held
            return ""
        if self.calls >= MAX_CALLS:
            return ""  # the rest is dropped
        self.in_call = True
        self.searched = self.scanned = 0
        self.scanner = CallScanner()
        return after

    def _call(self, text: str, out: ToolSplit) -> str:
        index = text.find(CLOSE, self.searched)  # the call's text so far, searched up to there before
        if index < 0:
            self.held = text
            self.searched = max(0, len(text) - len(CLOSE) + 1)
            self._scan(text, partial_tag_start(text, CLOSE), out)  # not what may be the tag's start
            return ""
        self.in_call = False
        out.add(self._close(text[:index], CLOSE))
        return text[index + len(CLOSE) :]

    def _scan(self, body: str, end: int, out: ToolSplit) -> None:
        if end > self.scanned:
            out.pieces += self.scanner.feed(body[self.scanned : end])
            self.scanned = end

    def _close(self, body: str, close: str = "") -> ToolSplit:
        out = ToolSplit()
        self._scan(body, len(body), out)
        pieces = self.scanner.close()
        if pieces is None:
            return ToolSplit(content=f"{OPEN}{body}{close}")
        self.calls += 1
        out.pieces += pieces
        return out

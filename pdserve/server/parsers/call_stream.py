"""One tool call's JSON object read as it is written, so that its deltas stream as vLLM's do: the call's
start (its name) as soon as the name is read, then its arguments' JSON text piece by piece.

    {"name": "get_weather", "arguments": {"city": "Pa   ->  CallPiece(name="get_weather"), '{"city": "Pa'
    ris", "unit": "celsius"}}                          ->  'ris", "unit": "celsius"}'

The arguments stream as the model wrote them, up to the brace that closes them; whatever follows inside
the object is not theirs. A call written another way (arguments first, or as a JSON string) cannot
stream: it is read whole once its object is complete (`close`), and given out then as two pieces.
Joined, a call's pieces are the same text however the answer was split.
"""

from __future__ import annotations

import json
import re

from pdserve.server.parsers.tool_calls import CallPiece, ParsedCall, call_of

# `{"name": "<name>", "arguments": ` (or "parameters"), up to the arguments' first character
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(\S)')


class JsonDepth:
    """How deep in brackets a JSON text is, read a character at a time (strings' brackets skipped)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def step(self, c: str) -> int:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
        return self.depth


class CallScanner:
    """One call object, fed as it comes (`feed`), then `close`d once its text is whole."""

    def __init__(self, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.text = ""
        self.keys = arguments_keys
        self.started = False
        self.scanned = 0  # how far into `text` the arguments were read (and given out)
        self.arguments = JsonDepth()
        self.args_done = False

    def feed(self, more: str) -> list[CallPiece]:
        self.text += more
        pieces: list[CallPiece] = []
        if not self.started:
            head = _HEAD.match(self.text)
            if head is None or head.group(2) != "{":
                return pieces
            self.started = True
            self.scanned = head.start(2)
            pieces.append(CallPiece(name=head.group(1)))
        fragment = self._arguments()
        if fragment:
            pieces.append(CallPiece(arguments=fragment))
        return pieces

    def _arguments(self) -> str:
        """The arguments' text read since last time, up to the brace that closes them."""
        start = self.scanned
        while self.scanned < len(self.text) and not self.args_done:
            self.args_done = self.arguments.step(self.text[self.scanned]) == 0
            self.scanned += 1
        return self.text[start : self.scanned]

    def close(self) -> list[CallPiece] | None:
        """The object is complete: the pieces still to give out; None if it is no call (and nothing of
        it was given out). A started call whose object turned out broken (cut by max_tokens, say)
        stays as it streamed."""
        if self.started:
            return []
        call = _whole(self.text, self.keys)
        return None if call is None else [CallPiece(call.name, call.arguments)]


def _whole(text: str, keys: tuple[str, ...]) -> ParsedCall | None:
    try:
        return call_of(json.loads(text), keys)
    except (ValueError, RecursionError):
        return None

"""Tool calls as the parsers find them (whole, or piece by piece as they stream), and the checks every
parser's JSON goes through."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_CALLS = 64  # calls in one answer; more is text


@dataclass(frozen=True)
class ParsedCall:
    """One call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class CallPiece:
    """A piece of a call as it streams: its start (`name` set: a new call) and/or more of its
    arguments' JSON text (parsers/call_stream.py)."""

    name: str | None = None
    arguments: str = ""


def assemble(pieces: list[CallPiece]) -> list[ParsedCall]:
    """The calls the pieces make, each's arguments the text its pieces carried."""
    calls: list[ParsedCall] = []
    for piece in pieces:
        if piece.name is not None:
            calls.append(ParsedCall(piece.name, piece.arguments))
        elif calls:
            calls[-1] = ParsedCall(calls[-1].name, calls[-1].arguments + piece.arguments)
    return calls


@dataclass
class ToolSplit:
    """One piece of content, parted into text and the pieces of calls it wrote (call_stream.py)."""

    content: str = ""
    pieces: list[CallPiece] = field(default_factory=list)

    def add(self, other: ToolSplit) -> ToolSplit:
        self.content += other.content
        self.pieces += other.pieces
        return self


class ToolParser(Protocol):
    """A parser of one answer's content, fed piece by piece, then finished."""

    def feed(self, text: str) -> ToolSplit: ...

    def finish(self) -> ToolSplit: ...


def call_of(obj: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """{"name": str, "arguments" (or "parameters"): an object, or JSON text of one} as a call; None if
    it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in arguments_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def json_values(text: str) -> list[Any] | None:
    """The JSON values `text` holds one after the other, separated by whitespace or `;`; None if any
    part of it is not JSON."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i = 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        values.append(value)

"""One choice's parsers in a row: the reasoning parser parts the text, the tool parser reads the
content part. What a chat answer's streamed deltas (calls piece by piece) and its whole message (the
same pieces assembled) are built from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pdserve.server.parsers.hermes import HermesParser
from pdserve.server.parsers.llama3_json import Llama3JsonParser
from pdserve.server.parsers.reasoning import ReasoningParser, Split
from pdserve.server.parsers.tool_calls import CallPiece, ParsedCall, ToolParser, assemble

TOOL_CALL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
}


@dataclass(frozen=True)
class ParserSpec:
    """What a request's answer is parsed with: a reasoning parser's name, and the tool mode: None
    (no tools parsed), "auto" with the server's tool parser, "required", or "function" (`function`)."""

    reasoning: str | None = None
    tool_parser: str | None = None
    tool_mode: Literal["auto", "required", "function"] | None = None
    function: str | None = None
    parallel_tool_calls: bool = True  # false: the first call only

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tool_mode is not None


@dataclass
class Parsed:
    """One piece of a choice's answer, parted; its calls as the pieces they streamed in."""

    reasoning: str = ""
    content: str = ""
    pieces: list[CallPiece] = field(default_factory=list)

    def add(self, other: Parsed) -> Parsed:
        self.reasoning += other.reasoning
        self.content += other.content
        self.pieces += other.pieces
        return self

    @property
    def calls(self) -> list[ParsedCall]:
        return assemble(self.pieces)


class ChoiceParser:
    """The parsers of one choice, fed its text piece by piece (`feed`), then `finish`ed."""

    def __init__(self, spec: ParserSpec) -> None:
        self.reasoning = ReasoningParser(spec.reasoning) if spec.reasoning else None
        self.tools = _tool_parser(spec)
        self.max_calls = None if spec.parallel_tool_calls else 1
        self.num_calls = 0  # calls started

    def feed(self, text: str) -> Parsed:
        split = self.reasoning.feed(text) if self.reasoning else Split(content=text)
        return self._tools(split, final=False)

    def finish(self) -> Parsed:
        split = self.reasoning.finish() if self.reasoning else Split()
        return self._tools(split, final=True)

    def _tools(self, split: Split, final: bool) -> Parsed:
        if self.tools is None:
            return Parsed(split.reasoning, split.content)
        tools = self.tools.feed(split.content)
        if final:
            tools.add(self.tools.finish())
        return Parsed(split.reasoning, tools.content, self._kept(tools.pieces))

    def _kept(self, pieces: list[CallPiece]) -> list[CallPiece]:
        """The pieces of the calls allowed (parallel_tool_calls false: the first call's only)."""
        kept = []
        for piece in pieces:
            self.num_calls += piece.name is not None
            if self.max_calls is None or self.num_calls <= self.max_calls:
                kept.append(piece)
        return kept

    @property
    def calls_given(self) -> int:
        """Calls started so far and kept: after priming with what a resumed stream's client has had,
        the index its next call takes."""
        return self.num_calls if self.max_calls is None else min(self.num_calls, self.max_calls)

    def whole(self, text: str) -> Parsed:
        """A whole answer, parsed as its stream would be."""
        return self.feed(text).add(self.finish())


def _tool_parser(spec: ParserSpec) -> ToolParser | None:
    if spec.tool_mode is None:
        return None
    if spec.tool_mode == "auto":
        assert spec.tool_parser is not None  # the request builder refuses auto without one
        return TOOL_CALL_PARSERS[spec.tool_parser]()
    return HermesParser()  # required / a named function: tool_call_grammar emits the hermes form

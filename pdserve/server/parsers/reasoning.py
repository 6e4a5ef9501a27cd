"""Reasoning parsers: the text between the think tags is the answer's reasoning, the rest its content.

    qwen3        reasoning only when the answer opens with <think> (Qwen3 writes the tag itself; with
                 chat_template_kwargs {"enable_thinking": false} its template closes the block in the
                 prompt and the answer is all content)
    deepseek_r1  the answer opens inside the block (QwQ's and R1's templates end the prompt with
                 <think>): everything up to </think> is reasoning; a leading <think> is dropped

The whitespace between </think> and the content is dropped, streamed or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.server.parsers.held import split_at_tag

START, END = "<think>", "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")


@dataclass
class Split:
    """One piece of the answer, parted."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """One answer's reasoning split, fed piece by piece (`feed`), then `finish`ed."""

    def __init__(self, name: str) -> None:
        if name not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}: one of {', '.join(REASONING_PARSERS)}")
        self.name = name
        self.state = "opening"  # -> reasoning -> after_end -> content
        self.held = ""

    def feed(self, text: str) -> Split:
        out = Split()
        text = self.held + text
        self.held = ""
        while text:
            text = getattr(self, f"_{self.state}")(text, out)
        return out

    def finish(self) -> Split:
        """The text held back at the end: whatever its state made of it."""
        held, self.held = self.held, ""
        in_reasoning = self.state == "reasoning" or (self.state == "opening" and self.name == "deepseek_r1")
        return Split(reasoning=held) if in_reasoning else Split(content=held)

    def _opening(self, text: str, out: Split) -> str:
        if text.startswith(START):
            self.state = "reasoning"
            return text[len(START) :]
        if START.startswith(text):  # maybe the tag, not whole yet
            self.held = text
            return ""
        self.state = "reasoning" if self.name == "deepseek_r1" else "content"
        return text

    def _reasoning(self, text: str, out: Split) -> str:
        before, after, held = split_at_tag(text, END)
        out.reasoning += before
        self.held = held
        if after is None:
            return ""
        self.state = "after_end"
        return after

    def _after_end(self, text: str, out: Split) -> str:
        rest = text.lstrip()
        if rest:
            self.state = "content"
        return rest

    def _content(self, text: str, out: Split) -> str:
        out.content += text
        return ""

"""The reasoning parsers on answers as Qwen3 and QwQ write them, fed whole, in two pieces split at
every position, and a character at a time: every way gives the same reasoning and content."""

from __future__ import annotations

import pytest

from pdserve.server.parsers.reasoning import ReasoningParser, Split

# recorded shapes: Qwen3-32B with thinking on (it writes <think> itself), QwQ-32B (its template
# ends the prompt with "<think>\n", so the answer opens inside the block), Qwen3 with thinking off
QWEN3 = "<think>\nThe user asks 2+2. That is 4.\n</think>\n\nThe answer is **4**."
QWQ = "Okay, 2+2: add them, 4. Check: yes.\n</think>\n\n2 + 2 = 4"
QWQ_OPEN_TAG = "<think>\nHmm < and > and </thin are text.\n</think>\n\nDone."
PLAIN = "Hello! <thinking> is a word; </think> here is text too."

CASES = [
    ("qwen3", QWEN3, "\nThe user asks 2+2. That is 4.\n", "The answer is **4**."),
    ("qwen3", PLAIN, "", PLAIN),  # no opening tag: all content
    ("qwen3", "<think>\ncut short by max_tok", "\ncut short by max_tok", ""),
    ("qwen3", "<thi", "", "<thi"),
    ("deepseek_r1", QWQ, "Okay, 2+2: add them, 4. Check: yes.\n", "2 + 2 = 4"),
    ("deepseek_r1", QWQ_OPEN_TAG, "\nHmm < and > and </thin are text.\n", "Done."),
    (
        "deepseek_r1",
        "still thinking when max_tokens ran out </thi",
        "still thinking when max_tokens ran out </thi",
        "",
    ),
    ("deepseek_r1", "<thi", "<thi", ""),
]


def parse(name: str, pieces: list[str]) -> Split:
    parser = ReasoningParser(name)
    total = Split()
    for piece in pieces:
        out = parser.feed(piece)
        total.reasoning += out.reasoning
        total.content += out.content
    end = parser.finish()
    return Split(total.reasoning + end.reasoning, total.content + end.content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_split_anywhere_gives_the_same_parts(name: str, text: str, reasoning: str, content: str) -> None:
    assert parse(name, [text]) == Split(reasoning, content)
    assert parse(name, list(text)) == Split(reasoning, content)
    for i in range(len(text) + 1):
        assert parse(name, [text[:i], "", text[i:]]) == Split(reasoning, content), i


def test_nothing_of_a_split_tag_leaks_early() -> None:
    parser = ReasoningParser("qwen3")
    assert parser.feed("<thi") == Split()  # may be the tag: held
    assert parser.feed("nk>abc</th") == Split(reasoning="abc")  # </th held
    assert parser.feed("ink>\n\n") == Split()
    assert parser.feed("Answer") == Split(content="Answer")


def test_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser("granite")

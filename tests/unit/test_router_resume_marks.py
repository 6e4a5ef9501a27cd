"""The router's reading of an instance's `id:` lines (router/sse.py split_id, router/resume.py): the
line is taken off the event, an id-only event is dropped, token ids and characters add up to the
`resume` field, and a bad or oversized line makes the stream unresumable instead of trusted."""

from __future__ import annotations

import pytest

from pdserve.router.resume import MAX_TOKENS, BadMark, Progress, parse_mark
from pdserve.router.sse import split_id


def test_split_id() -> None:
    assert split_id(b'data: {"a": 1}\n\n') == (b'data: {"a": 1}\n\n', None)
    assert split_id(b'id: 5:1,2\ndata: {"a": 1}\n\n') == (b'data: {"a": 1}\n\n', b"5:1,2")
    assert split_id(b"id: 5:3\n\n") == (None, b"5:3")
    assert split_id(b"data: [DONE]\n\n") == (b"data: [DONE]\n\n", None)


def test_parse_mark() -> None:
    assert parse_mark(b"12:345,678") == (12, [345, 678])
    assert parse_mark(b"0:") == (0, [])
    for bad in (b"12", b"x:1", b"-1:2", b"3:1,,2", b"3:1,a", b"3: 1"):
        with pytest.raises(BadMark):
            parse_mark(bad)


def _chunk(text: str, finish: str | None = None) -> dict[str, object]:
    choice = {"delta": {"content": text}, "finish_reason": finish}
    return {"id": "chatcmpl-1", "created": 7, "choices": [choice]}


def test_progress_builds_the_resume_field() -> None:
    progress = Progress()
    assert not progress.resumable
    assert progress.mark(b"3:10,11")
    progress.see(_chunk("abc"))
    assert not progress.mark(b"3:")
    assert progress.mark(b"3:12")  # held-back text: ids, no characters
    assert progress.resumable
    assert progress.resume_field() == {
        "output_token_ids": [10, 11, 12],
        "text_chars_sent": 3,
        "completion_id": "chatcmpl-1",
        "created": 7,
    }
    progress.see(_chunk("d", "stop"))
    assert not progress.resumable  # finished: nothing left to resume


@pytest.mark.parametrize("line", [b"nonsense", b"2:1", b"9:" + b",".join([b"1"] * (MAX_TOKENS + 1))])
def test_a_bad_mark_makes_the_stream_unresumable(line: bytes) -> None:
    progress = Progress()
    progress.mark(b"5:1")
    progress.see(_chunk("hello"))
    progress.mark(line)  # garbage, characters going back, or too many tokens
    assert progress.broken is not None and not progress.resumable

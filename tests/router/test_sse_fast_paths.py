"""The relay's byte-level fast paths (router/sse.py): a body is cut into the same events however its
chunks fall, a leading `id:` line is split off as the general path does, and `needs_parse` lets
through unparsed only events that can hold nothing the relay acts on (no error, usage, finish_reason
or [DONE]), whatever the JSON's spacing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from pdserve.router.sse import event_data, needs_parse, split_id, sse_batches

TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]'
TOKEN += b',"usage":null}\n\n'
MARKED = b"id: 2:17\n" + TOKEN
BODY = [b"data: {}\n\n", MARKED, b"id: 2:18\n\n", TOKEN, b"data: [DONE]\n\n"]


def batches(chunks: list[bytes]) -> list[list[bytes]]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def read() -> list[list[bytes]]:
        return [b async for b in sse_batches(stream())]

    return asyncio.run(read())


def cut(body: list[bytes], chunks: list[bytes]) -> list[bytes]:
    return [event for batch in batches(chunks) for event in batch]


def test_events_are_the_same_however_the_body_is_chunked() -> None:
    whole = b"".join(BODY)
    assert cut(BODY, BODY) == BODY  # one event a chunk: passed on as they are
    assert cut(BODY, [whole]) == BODY  # all in one chunk
    assert batches([whole]) == [BODY]  # relayed as one write
    assert cut(BODY, [whole[i : i + 7] for i in range(0, len(whole), 7)]) == BODY  # events split
    assert cut(BODY, [b"d", b"ata: {}\n", b"\n"]) == [b"data: {}\n\n"]  # a 1-byte chunk is no event
    assert cut(BODY, [whole.replace(b"\n", b"\r\n")]) == BODY
    assert cut(BODY, [b"data: {}\n\n\n\ndata: [DONE]"]) == [b"data: {}\n\n", b"\n\n", b"data: [DONE]\n\n"]


def test_split_id_fast_path_matches_the_general_one() -> None:
    assert split_id(MARKED) == (TOKEN, b"2:17")
    assert split_id(b"id: 2:18\n\n") == (None, b"2:18")
    assert split_id(b"id:3:\n\n\n") == (None, b"3:")
    assert split_id(b"id: 1:5\nid: 2:6\n" + TOKEN) == (TOKEN, b"2:6")  # two id lines: the last one
    assert split_id(b": ping\nid: 4:7\n" + TOKEN) == (b": ping\n" + TOKEN, b"4:7")


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_needs_parse_only_for_what_the_relay_acts_on(separators: tuple[str, str]) -> None:
    def event(obj: object) -> bytes:
        return b"data: " + json.dumps(obj, separators=separators).encode() + b"\n\n"

    def chunk(content: str, finish: str | None = None, usage: object = None) -> dict[str, object]:
        choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
        return {"id": "c", "choices": [choice], "usage": usage}

    plain = [chunk("hi"), chunk('"usage": 1, "error": {}, "finish_reason": "stop"'), chunk("[DON")]
    for obj in plain:
        assert not needs_parse(event(obj)), obj
    acted_on = [
        chunk("", "stop"),
        chunk("", None, {"completion_tokens": 3}),
        {"error": {"message": "engine died", "code": "engine_dead"}},
    ]
    for obj in acted_on:
        assert needs_parse(event(obj)) and event_data(event(obj)) == obj
    assert needs_parse(b"data: [DONE]\n\n")

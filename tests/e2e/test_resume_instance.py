"""The instance side of resume (issue 25, R1-R2) over real HTTP on the shared `server` process: the
X-PDServe-Resumable header's id lines, a stream cut after k events and resumed with `resume`, and the
requests a resume is refused with (400)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, ServerProcess

CHAT = [{"role": "user", "content": "Tell me a short story about a dragon."}]
RESUMABLE = {"X-PDServe-Resumable": "1"}
BASE = {"model": MODEL, "max_tokens": 16, "ignore_eos": True, "stream": True}
BASE_USAGE = {**BASE, "stream_options": {"include_usage": True}}
NEVER = "@@never-in-this-text@@"  # a long stop string: the last 21 characters wait behind it


Event = tuple[tuple[int, list[int]] | None, dict[str, Any] | str | None]


@dataclass
class Stream:
    """One SSE answer, event by event: ids (chars, token ids; None: no id), data (None: id only)."""

    events: list[Event] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for ident, _ in self.events if ident for t in ident[1]]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [d for _, d in self.events if isinstance(d, dict)]

    @property
    def text(self) -> str:
        return "".join(_piece(c) for c in self.chunks)

    @property
    def usage(self) -> dict[str, Any]:
        return next(c["usage"] for c in self.chunks if c.get("usage"))


def _piece(chunk: dict[str, Any]) -> str:
    if not chunk["choices"]:
        return ""
    c = chunk["choices"][0]
    return str(c.get("text") or c.get("delta", {}).get("content") or "")


def _event(block: str) -> Event:
    ident, data = None, None
    for line in block.split("\n"):
        if line.startswith("id: "):
            chars, _, ids = line[4:].partition(":")
            ident = (int(chars), [int(t) for t in ids.split(",") if t])
        elif line.startswith("data: "):
            data = line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
    return ident, data


def stream(
    server: ServerProcess, path: str, body: dict[str, Any], headers: dict[str, str], cut: int = 0
) -> tuple[Stream, str]:
    """POST and read the event stream (and its raw text); with `cut`, hang up after that many id lines."""
    out, raw, buffer = Stream(), "", ""
    with httpx.stream(
        "POST", f"{server.v1}{path}", json=body, headers={**server.headers, **headers}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for text in r.iter_text():
            raw, buffer = raw + text, buffer + text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                out.events.append(_event(block))
                if cut and sum(1 for i, _ in out.events if i) == cut:
                    return out, raw
    return out, raw


def resume_of(part: Stream) -> dict[str, Any]:
    last = [i for i, _ in part.events if i][-1]
    first = part.chunks[0]
    return {
        "output_token_ids": part.token_ids,
        "text_chars_sent": last[0],
        "completion_id": first["id"],
        "created": first["created"],
    }


@pytest.mark.parametrize(
    ("path", "body", "cuts"),
    [
        ("/chat/completions", {**BASE_USAGE, "messages": CHAT, "temperature": 0.0}, (1, 9)),
        ("/completions", {**BASE_USAGE, "prompt": "Once upon a time", "temperature": 0.8, "seed": 7}, (6,)),
    ],
    ids=["chat-greedy", "completion-seeded"],
)
def test_a_cut_stream_resumed_continues_the_fault_free_answer(
    server: ServerProcess, tokenizer: Any, path: str, body: dict[str, Any], cuts: tuple[int, ...]
) -> None:
    whole, _ = stream(server, path, body, RESUMABLE)
    assert whole.events[-1][1] == "[DONE]"
    # the ids concatenate to the answer's tokens, and each id's chars count the text sent so far
    assert len(whole.token_ids) == 16 == whole.usage["completion_tokens"]
    assert tokenizer.decode(whole.token_ids, skip_special_tokens=True) == whole.text
    sent = 0
    for ident, data in whole.events:
        sent += len(_piece(data)) if isinstance(data, dict) else 0
        if ident is not None:
            assert ident[0] == sent and len(ident[1]) == 1
        elif isinstance(data, dict):  # the role, the finish chunk after its tokens' event, usage
            assert not _piece(data), "text without an id"
    for k in cuts:
        part, _ = stream(server, path, body, RESUMABLE, cut=k)
        assert part.token_ids == whole.token_ids[:k]
        rest, _ = stream(server, path, {**body, "resume": resume_of(part)}, RESUMABLE)
        assert rest.token_ids == whole.token_ids[k:], f"cut after {k}"
        assert part.text + rest.text == whole.text, f"cut after {k}"
        assert {c["id"] for c in rest.chunks} == {part.chunks[0]["id"]} != {whole.chunks[0]["id"]}
        assert {c["created"] for c in rest.chunks} == {part.chunks[0]["created"]}
        assert not any("role" in (c["choices"] or [{}])[0].get("delta", {}) for c in rest.chunks)
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert [rest.usage[n] for n in counts] == [whole.usage[n] for n in counts], "usage counts once"
        assert rest.usage["prompt_tokens_details"]["cached_tokens"] <= whole.usage["prompt_tokens"]
        assert rest.chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_without_the_header_no_ids_and_held_back_text_gets_id_only_events(
    server: ServerProcess, tokenizer: Any
) -> None:
    body = {**BASE, "messages": CHAT, "temperature": 0.0, "max_tokens": 12, "stop": [NEVER]}
    plain, raw = stream(server, "/chat/completions", body, {})
    assert "id:" not in raw.replace('"id":', "") and all(i is None for i, _ in plain.events)
    marked, _ = stream(server, "/chat/completions", body, RESUMABLE)
    assert marked.text == plain.text and len(marked.token_ids) == 12
    id_only = [i for i, d in marked.events if d is None]
    assert id_only and all(i is not None for i in id_only), "held-back tokens carry no id-only event"
    # an answer over n > 1 choices has no ids
    many, _ = stream(server, "/chat/completions", {**body, "n": 2}, RESUMABLE)
    assert all(i is None for i, _ in many.events)


def test_a_non_streamed_resume_holds_the_whole_answer(server: ServerProcess) -> None:
    body = {**BASE, "messages": CHAT, "temperature": 0.0, "max_tokens": 10}
    part, _ = stream(server, "/chat/completions", body, RESUMABLE, cut=4)
    whole = httpx.post(
        f"{server.v1}/chat/completions",
        json={**body, "stream": False},
        headers=server.headers,
        timeout=120,
    ).json()
    resumed = httpx.post(
        f"{server.v1}/chat/completions",
        json={**body, "stream": False, "resume": resume_of(part)},
        headers=server.headers,
        timeout=120,
    ).json()
    assert resumed["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [resumed["usage"][n] for n in counts] == [whole["usage"][n] for n in counts]
    assert resumed["id"] == part.chunks[0]["id"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"n": 2}, "n = 1"),
        ({"resume": {"output_token_ids": [10**6]}}, "output_token_ids"),
        ({"resume": {"output_token_ids": []}}, "output_token_ids"),
        ({"resume": {"text_chars_sent": 10**6}}, "text_chars_sent"),
        ({"resume": {"text_chars_sent": -1}}, "text_chars_sent"),
        ({"resume": {"completion_id": "a b\n"}}, "completion_id"),
        ({"resume": {"surprise": 1}}, "surprise"),
        ({"max_tokens": 2}, "context"),
    ],
)
def test_an_invalid_resume_is_a_400(server: ServerProcess, change: dict[str, Any], says: str) -> None:
    resume = {"output_token_ids": [42, 43, 44], "text_chars_sent": 0, "completion_id": "c-x", "created": 1}
    body: dict[str, Any] = {**BASE, "messages": CHAT, "resume": resume}
    for key, value in change.items():
        body[key] = {**resume, **value} if key == "resume" else value
    if "max_tokens" in change:  # three resumed tokens past a budget of two: more than it could have made
        body["resume"] = {**resume, "output_token_ids": [42] * 9000}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"] + str(error.get("param"))

"""Server-sent events as the router writes and reads them: one JSON event, a body cut into whole
events, an event's `id:` line split off, its data and error code, whether it carries a token yet, and
whether its data must be parsed at all once tokens flow (`needs_parse`).

The relay's per-event cost matters: every output token of every stream crosses it. So the common cases
take a fast path on bytes: a body chunk that is one whole event is passed on as it is (the events of
one chunk are relayed as one write), an `id:` line that leads its event is cut off by one slice, and an
event that can only be a plain token (no error, usage, finish_reason or [DONE]) is never parsed after
the first token.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

DONE = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


# ---- reading SSE events -----------------------------------------------------------------------------------


async def sse_batches(body: AsyncIterator[bytes]) -> AsyncGenerator[list[bytes], None]:
    """A response body (its chunks as they come) cut into whole events (each ending in a blank line),
    the events that each chunk completes in one list."""
    rest = b""
    async for chunk in body:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if rest:
            chunk, rest = rest + chunk, b""
        if 0 <= chunk.find(b"\n\n") == len(chunk) - 2:  # one whole event: an instance's usual chunk
            yield [chunk]
            continue
        *events, rest = chunk.split(b"\n\n")
        if events:
            yield [event + b"\n\n" for event in events]
    if rest.strip():
        yield [rest if rest.endswith(b"\n\n") else rest.rstrip(b"\n") + b"\n\n"]


def split_id(event: bytes) -> tuple[bytes | None, bytes | None]:
    """The event without its `id:` lines (None if nothing else is left: an id-only event), and the
    value of its last `id:` line (None without one)."""
    if event.startswith(b"id:"):  # an instance's marked event: the id line first, and only one
        end = event.find(b"\n")
        rest = event[end + 1 :]
        if end > 0 and not rest.startswith(b"id:") and b"\nid:" not in rest:
            rest = rest.strip(b"\n")
            return (rest + b"\n\n" if rest.strip() else None), event[3:end].strip()
    elif b"\nid:" not in event:
        return event, None
    lines = event.split(b"\n")
    marks = [line[3:].strip() for line in lines if line.startswith(b"id:")]
    rest = b"\n".join(line for line in lines if not line.startswith(b"id:")).strip(b"\n")
    return (rest + b"\n\n" if rest.strip() else None), marks[-1]


# A key the relay acts on with a value that is not null, or the end marker. A JSON key is matched only
# as a key: inside a string its quotes would be escaped. A match only costs a parse.
_NEEDS_PARSE = re.compile(rb'"(?:error|usage|finish_reason)"\s*:(?!\s*null\b)|\[DONE\]')


def needs_parse(event: bytes) -> bool:
    """False for an event that can hold nothing but tokens (no error, usage, finish_reason or [DONE]):
    once a token has reached the client, the relay passes those on unparsed."""
    return _NEEDS_PARSE.search(event) is not None


def event_data(event: bytes) -> Any:
    """The event's data as JSON; "[DONE]" for the end marker; None without (valid JSON) data."""
    payload = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")).strip()
    if payload == b"[DONE]":
        return "[DONE]"
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


def error_code(data: Any) -> str | None:
    """The `code` of an OpenAI error object (a whole answer or an SSE event), else None. An error whose
    code is null (a 400's usually is) is named by its `type` (e.g. "invalid_request_error")."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        for name in (error.get("code"), error.get("type")):
            if name is not None and name != "":
                return str(name)
        return "error"
    return None


def carries_token(data: Any) -> bool:
    """False only for events that say nothing yet: the role preamble, comments, empty deltas."""
    if not isinstance(data, dict) or "error" in data:
        return data is not None
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return True  # the usage chunk and anything unexpected count as content
    for choice in choices:
        if not isinstance(choice, dict):
            return True
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        if (
            choice.get("text")
            or delta.get("content")
            or choice.get("finish_reason")
            or choice.get("logprobs")
        ):
            return True
    return False


def json_error_code(content: bytes) -> str | None:
    try:
        return error_code(json.loads(content))
    except ValueError:
        return None

"""How a front refuses HTTP its parser will not take: OpenAI's error shape, then a lingering close.

The answer is 431 for a request head over MAX_REQUEST_HEAD_BYTES, 400 for anything else the parser
refuses. The connection then closes gently: it stops writing, then reads and drops what the client is
still sending until the client closes (or LINGER_S pass). Closing at once with unread bytes in the
socket makes the kernel send a reset, which can destroy the answer before the client reads it. Both
uvicorn protocols (httptools_front.py, h11_front.py) use it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from pdserve.http_edge.errors import error_json, raw_response

LINGER_S = 5.0  # how long a client whose connection we close may go on sending (nginx's lingering_timeout)


class Draining(Protocol):
    """The protocol a LingeringClose belongs to: `draining` once it closed (it drops what it reads)."""

    draining: bool
    loop: asyncio.AbstractEventLoop


class LingeringClose:
    """The connection's transport, with `close` replaced by a gentle one: stop writing, drop what the
    client still sends until it closes or LINGER_S pass, then close. Closing at once with unread bytes
    (a refused 300 MB body, a header over the limit) makes the kernel send a reset, which can destroy
    the answer before the client reads it. The client's own close ends the wait: asyncio closes the
    transport at EOF (both protocols' eof_received return None)."""

    def __init__(self, transport: asyncio.Transport, protocol: Draining) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        raw = self._transport
        if self._protocol.draining or raw.is_closing():
            return
        self._protocol.draining = True
        raw.resume_reading()  # reads may be paused (a body over the high-water mark)
        if raw.can_write_eof():
            raw.write_eof()
        self._protocol.loop.call_later(LINGER_S, raw.close)

    def is_closing(self) -> bool:
        return self._protocol.draining or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def refusal(head_too_large: bool, limit: int) -> bytes:
    """The whole answer to a request the parser refused (it closes the connection)."""
    if head_too_large:
        status, reason = 431, "Request Header Fields Too Large"
        message = f"the request head is larger than the server's limit of {limit} bytes"
    else:
        status, reason, message = 400, "Bad Request", "invalid HTTP request"
    body = error_json(message, "invalid_request_error", "invalid_http_request")
    return raw_response(status, reason, body)

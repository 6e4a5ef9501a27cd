"""The uvicorn server of an instance or of the router: keep-alive, malformed HTTP, the access log.

uvicorn answers what its HTTP parser refuses (headers over its limit, a broken request line) itself, in
plain text; the protocol here answers the same in OpenAI's error shape: 431 for a request head over the
parser's limit, 400 otherwise. It closes the connection gently: it stops writing, then reads and drops
what the client is still sending until the client closes (or LINGER_S pass). Closing at once with
unread bytes in the socket makes the kernel send a reset, which can destroy the answer before the
client reads it.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from pdserve.http_edge.access_log import quiet_polls
from pdserve.http_edge.errors import error_json, raw_response
from pdserve.http_edge.limits import SERVER_KEEP_ALIVE_S

GRACEFUL_SHUTDOWN_S = 5
LINGER_S = 5.0  # how long a client whose connection we close may go on sending (nginx's lingering_timeout)


class _LingeringClose:
    """The connection's transport, with `close` replaced by a gentle one: stop writing, drop what the
    client still sends until it closes or LINGER_S pass, then close. Closing at once with unread bytes
    (a refused 300 MB body, a header over the limit) makes the kernel send a reset, which can destroy
    the answer before the client reads it. The client's own close ends the wait: asyncio closes the
    transport at EOF (H11Protocol.eof_received returns None)."""

    def __init__(self, transport: asyncio.Transport, protocol: OpenAIShapedH11) -> None:
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


class OpenAIShapedH11(H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol: its plain-text 400 answered as an OpenAI error; every close lingers."""

    draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has asyncio.Transport's methods without being its subclass
        stream = cast(asyncio.Transport, transport)
        super().connection_made(cast(asyncio.Transport, _LingeringClose(stream, self)))

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if len(self.conn.trailing_data[0]) > limit:
            status, reason = 431, "Request Header Fields Too Large"
            message = f"the request head is larger than the server's limit of {limit} bytes"
        else:
            status, reason, message = 400, "Bad Request", "invalid HTTP request"
        body = error_json(message, "invalid_request_error", "invalid_http_request")
        self.transport.write(raw_response(status, reason, body))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return  # the rest of a request we have answered and closed: dropped unparsed
        super().data_received(data)


def uvicorn_config(
    app: Any, host: str, port: int, log_level: str, access_log: bool = True, log_polls: bool = False
) -> Any:
    """The uvicorn.Config both fronts use (h11, whatever else is installed, so malformed HTTP is
    answered in one shape)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        http=OpenAIShapedH11,
        timeout_keep_alive=SERVER_KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    quiet_polls(not log_polls)  # after Config(), which sets up uvicorn's loggers
    return config

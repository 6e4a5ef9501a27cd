"""uvicorn's httptools protocol (llhttp, a C parser), answering malformed HTTP in OpenAI's shape with a
lingering close, and with a limit on the request head that uvicorn's own httptools protocol lacks.

llhttp has no limit on a request's head: it hands each header over once it is complete and httptools
keeps the pieces in memory until then, so a client could send an endless header. Here a head is refused
with 431 once more than the limit has arrived without its end, and also when it ends but is over the
limit (whatever the TCP segments were, a head over the limit is refused).
"""

from __future__ import annotations

import asyncio
from typing import cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pdserve.http_edge.limits import MAX_REQUEST_HEAD_BYTES
from pdserve.http_edge.refusal import LingeringClose, refusal

_VERSION_AND_ENDS = len(b"  HTTP/1.1\r\n\r\n")  # the request line's spaces, its version, the blank line


class HeadTooLarge(Exception):
    """Raised from the parser's callback: httptools wraps it in an HttpParserError, which uvicorn's
    data_received answers with send_400_response (431 here, see `_head_too_large`)."""


class OpenAIShapedHttpTools(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol: a head over the limit is a 431, other parser errors a 400, both
    as OpenAI errors; every close lingers."""

    draining = False
    _in_head = True  # between the end of a request (or the connection's start) and its next head's end
    _head_bytes = 0  # bytes received since this head began (while _in_head)
    _head_too_large = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has asyncio.Transport's methods without being its subclass
        stream = cast(asyncio.Transport, transport)
        super().connection_made(cast(asyncio.Transport, LingeringClose(stream, self)))

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return  # the rest of a request we have answered and closed: dropped unparsed
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self._limit() and not self.draining:
            self._head_too_large = True  # no end of the head in sight: not buffered any further
            self.logger.warning("Invalid HTTP request received.")  # as uvicorn logs a parser error
            self.send_400_response("request head too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = _VERSION_AND_ENDS + len(self.parser.get_method()) + len(self.url)
        size += sum(len(name) + len(value) + 4 for name, value in self.headers)  # "name: value\r\n"
        if size > self._limit():
            self._head_too_large = True
            raise HeadTooLarge
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self.draining:
            return
        self.transport.write(refusal(self._head_too_large, self._limit()))
        self.transport.close()

    def _limit(self) -> int:
        return int(self.config.h11_max_incomplete_event_size or MAX_REQUEST_HEAD_BYTES)

"""uvicorn's h11 protocol, answering malformed HTTP in OpenAI's shape with a lingering close: the
fallback where httptools (httptools_front.py) is not importable.

h11 refuses a head that is still incomplete once its buffer holds more than the limit (431 here).
"""

from __future__ import annotations

import asyncio
from typing import cast

from uvicorn.protocols.http.h11_impl import H11Protocol

from pdserve.http_edge.limits import MAX_REQUEST_HEAD_BYTES
from pdserve.http_edge.refusal import LingeringClose, refusal


class OpenAIShapedH11(H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol: its plain-text 400 answered as an OpenAI error; every close lingers."""

    draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has asyncio.Transport's methods without being its subclass
        stream = cast(asyncio.Transport, transport)
        super().connection_made(cast(asyncio.Transport, LingeringClose(stream, self)))

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or MAX_REQUEST_HEAD_BYTES
        self.transport.write(refusal(len(self.conn.trailing_data[0]) > limit, limit))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return  # the rest of a request we have answered and closed: dropped unparsed
        super().data_received(data)

"""413 for a request body over the limit, before it is read whole: from its Content-Length at once, or
counted while a chunked body streams in. The answer closes the connection, so nobody reads the rest.

    Content-Length > limit   -> 413 before the app runs (nothing of the body is read)
    chunked, sum > limit     -> the app's read fails, 413 (unless its answer had already begun)

A pure ASGI middleware: the app reads the body as before, through a counting `receive`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.http_edge.errors import error_json

_CLOSE = [(b"content-type", b"application/json"), (b"connection", b"close")]


class _BodyTooLarge(Exception):
    """Raised out of the app's `receive`; caught by the middleware (no app handler knows this type)."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _content_length(scope) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if started:  # cannot happen with our apps (they read the body first); nothing to answer
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        body = error_json(message, "invalid_request_error", "request_too_large")
        headers = [*_CLOSE, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the HTTP parser refuses a malformed one before we get here
    return 0

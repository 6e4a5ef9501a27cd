"""Relaying one upstream stream to the client, event by event.

Disaggregated, events are held back until the first one that carries a token, so a prefill retry is
invisible: a "prefill_failed" error event before that token closes the upstream request and reopens
it on another prefill instance (if proxy.py allows one). An instance that dies mid-answer ends the
stream with an "instance_failed" error event and [DONE]. However the response ends, even before it
begins, the upstream request is closed and the instances' counts released.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.router.errors import RouterError, error_body
from pdserve.router.sse import (
    DONE,
    carries_token,
    error_code,
    event_data,
    json_error_code,
    sse_event,
    sse_events,
)

if TYPE_CHECKING:
    from pdserve.router.proxy import Call, Proxy, Route


class Relay:
    """One stream: events passed through as they come (disaggregated: held back until the first one that
    carries a token, so a prefill retry stays invisible); an instance that breaks off ends it with an
    error event and [DONE]."""

    def __init__(self, proxy: Proxy, call: Call, route: Route, response: httpx.Response) -> None:
        self.proxy, self.call = proxy, call
        self.route, self.response = route, response
        self.committed = False  # an event with a token has reached the client
        self.ended = False  # [DONE] or an error event has reached the client
        self.retry = False

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                async for event in self.pump():
                    yield event
                if not self.retry:
                    break
                await self.close()
                failure = await self.reopen()
                if failure is not None:
                    self.ended = True
                    yield failure
                    break
            if not self.ended:
                message = f"instance {self.route.target.url} ended the stream early"
                self.proxy.metrics.count_error("instance_failed")
                yield sse_event(error_body(message, "server_error", "instance_failed")) + DONE
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()
            self.proxy.metrics.e2e.observe(time.monotonic() - self.call.arrival)
            self.call.span.end()

    async def pump(self) -> AsyncIterator[bytes]:
        held: list[bytes] = []
        hold = self.route.prefill is not None
        try:
            async for event in sse_events(self.response):
                data = event_data(event)
                if not self.committed:
                    if self.proxy.retry_prefill(self.call, self.route, error_code(data)):
                        self.retry = True
                        return
                    if hold and not carries_token(data):
                        held.append(event)
                        continue
                    self.commit(data)
                self.ended = self.ended or data == "[DONE]" or error_code(data) is not None
                yield b"".join(held) + event
                held = []
        except httpx.HTTPError as e:
            failure = self.proxy.instance_failed(self.route.target, e)
            self.proxy.metrics.count_error(failure.code)
            self.ended = True
            yield b"".join(held) + sse_event(failure.body()) + DONE
            return
        if held:
            yield b"".join(held)

    def commit(self, data: Any) -> None:
        if isinstance(data, dict) and error_code(data) is None and carries_token(data):
            self.committed = True
            self.route.prefill_done()
            self.proxy.metrics.ttft.observe(time.monotonic() - self.call.arrival)

    async def reopen(self) -> bytes | None:
        """The prefill retry: None once its stream is open, else the error event that ends this stream."""
        self.retry = False
        try:
            self.route, self.response = await self.proxy.open(self.call)
            if self.response.status_code == 200:
                return None
            status = self.response.status_code
            content = await self.proxy.read(self.route, self.response)
        except RouterError as e:
            self.proxy.metrics.count_error(e.code)
            return sse_event(e.body()) + DONE
        code = json_error_code(content)
        if code is None:
            return (
                sse_event(error_body(f"instance answered HTTP {status}", "server_error", "instance_failed"))
                + DONE
            )
        self.proxy.metrics.count_error(f"upstream_{code}")
        return sse_event(json.loads(content)) + DONE

    async def close(self) -> None:
        self.route.release()
        await self.response.aclose()


class SSEResponse(StreamingResponse):
    """The relay's event stream; the relay is closed however the response ends, even if it never began."""

    body_iterator: AsyncIterator[bytes]

    def __init__(self, relay: Relay) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(relay.events(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.relay.close()

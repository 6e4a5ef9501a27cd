"""A graceful drain of one HTTP front (an instance or the router): what SIGTERM starts.

    SIGTERM ──▶ draining: GET /health 503 {"status": "draining"}, new completion requests 503 `code`,
                the `on_begin` hooks run (leave the registry, refuse new KV Reserves)
            ──▶ the requests in flight run to their end, for up to `timeout` seconds
            ──▶ the rest are cut: a stream ends with an error event `code` and [DONE], an answer not yet
                begun is 503 `code`; then the `settle` hooks (a prefill's transfers) get what is left
            ──▶ `on_done(seconds, cut)`, and the server stops (exit status 0)
    a second SIGTERM or SIGINT ──▶ stop at once

The drain knows the requests only as ASGI calls (`DrainGate`); what the answers say is the caller's
(server/drain.py, router/drain.py). Before the server has started, a signal stops it as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import anyio
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

DRAINING_HEALTH = b'{"status":"draining"}'
DONE = b"data: [DONE]\n\n"
CUT_GRACE_S = 5.0  # how long cut requests get to send their last event
POLL_S = 0.05


@dataclass
class _Answer:
    """What one tracked request has sent so far."""

    started: bool = False
    event_stream: bool = False
    done: bool = False  # its last body message went out
    sent_done: bool = False  # its body so far ends with [DONE]


@dataclass
class Drain:
    """The drain state of one front: `draining`, the requests in flight, the hooks of each phase."""

    timeout: float
    error: dict[str, Any]  # the OpenAI-shaped body of a refusal (its code: instance/router_draining)
    name: str = "instance"
    on_begin: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    settle: list[Callable[[float], Awaitable[None]]] = field(default_factory=list)  # given the deadline
    on_refused: Callable[[], None] = lambda: None
    on_done: Callable[[float, int], None] = lambda seconds, cut: None
    stop: Callable[[], None] = lambda: None  # set by DrainingServer: ask the server to stop
    draining: bool = False
    started_at: float = 0.0
    finished_at: float = 0.0
    cut: int = 0
    _open: set[anyio.CancelScope] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def elapsed(self) -> float:
        """Seconds since the drain began (0 before; once drained, how long it took)."""
        if not self.draining:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    def begin(self) -> None:
        """Start draining (on the event loop); a drain already under way goes on."""
        if self.draining:
            return
        self.draining, self.started_at = True, time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        logger.info(
            "draining: %d requests in flight, up to %gs; new requests are refused",
            self.in_flight,
            self.timeout,
        )
        deadline = self.started_at + self.timeout
        await asyncio.gather(*(_quietly(hook()) for hook in self.on_begin))  # none waits for another
        await self._wait_idle(deadline)
        if self._open:
            self.cut = len(self._open)
            logger.warning("drain timeout (%gs): ending %d requests still running", self.timeout, self.cut)
            for scope in list(self._open):
                scope.cancel()
            await self._wait_idle(time.monotonic() + CUT_GRACE_S)
        for settle in self.settle:
            await _quietly(settle(deadline))
        self.finished_at = time.monotonic()
        seconds = self.elapsed()
        self.on_done(seconds, self.cut)
        logger.info("drained in %.2fs (%d requests ended by the drain); stopping", seconds, self.cut)
        self.stop()

    async def _wait_idle(self, deadline: float) -> None:
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)

    async def track(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one request; cut by the drain, it ends with the refusal (an event, or a 503)."""
        answer = _Answer()

        async def watched(message: Message) -> None:
            _note(answer, message)
            await send(message)

        cancel = anyio.CancelScope()
        self._open.add(cancel)
        try:
            with cancel:
                await app(scope, receive, watched)
            if cancel.cancel_called and not answer.done:
                with contextlib.suppress(Exception):  # the client may be gone too
                    await self._end(answer, send)
        finally:
            self._open.discard(cancel)

    async def refuse(self, send: Send) -> None:
        await _json(send, 503, json.dumps(self.error).encode())

    async def _end(self, answer: _Answer, send: Send) -> None:
        if not answer.started:
            await self.refuse(send)
            return
        last = b""
        if answer.event_stream and not answer.sent_done:
            last = b"data: " + json.dumps(self.error).encode() + b"\n\n" + DONE
        await send({"type": "http.response.body", "body": last, "more_body": False})


def _note(answer: _Answer, message: Message) -> None:
    if message["type"] == "http.response.start":
        answer.started = True
        headers = dict(message.get("headers", []))
        answer.event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
    elif message["type"] == "http.response.body":
        body = message.get("body", b"")
        if body:
            answer.sent_done = body.endswith(DONE)
        answer.done = not message.get("more_body", False)


async def _json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _quietly(work: Awaitable[None]) -> None:
    """A drain hook's failure is logged; the drain goes on (it must end in an exit)."""
    try:
        await work
    except Exception:  # noqa: BLE001 - e.g. an unreachable registry: its entry then expires
        logger.exception("a drain step failed; draining on")


class DrainGate:
    """ASGI middleware: /health says "draining", completion requests are refused or tracked."""

    def __init__(self, app: ASGIApp, drain: Drain, paths: tuple[str, ...]) -> None:
        self.app, self.drain, self.paths = app, drain, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, drain = scope["path"], self.drain
        if drain.draining and path == "/health":
            await _json(send, 503, DRAINING_HEALTH)
        elif scope["method"] == "POST" and path in self.paths:
            if drain.draining:
                drain.on_refused()
                await drain.refuse(send)
            else:
                await drain.track(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn, where the first SIGTERM/SIGINT starts `drain` and a second one stops at once. (uvicorn's
    own handler re-raises the signal after its shutdown, which would kill us before cleanup.)"""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        drain.stop = self._stop
        self._loop: asyncio.AbstractEventLoop | None = None

    def _stop(self) -> None:
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._loop = asyncio.get_running_loop()
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._signalled) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.should_exit:
            logger.warning("%s again: stopping now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
        elif not self.started or self._loop is None:
            self.should_exit = True  # not serving yet: nothing to drain
        else:
            self._loop.call_soon_threadsafe(self.drain.begin)

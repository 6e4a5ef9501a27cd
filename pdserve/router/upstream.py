"""The router's HTTP client to its instances: pooled keep-alive connections, the one retry that a
connection the instance had already closed earns, and the client's errors as three typed ones.

The client is aiohttp's: every relayed token crosses it, and its C parser and asyncio-native reads cost
a third to a half of httpx2's per chunk (and httpx 0.x's pool is O(n^2) in open connections: it capped
one router at ~2.5k chunks/s; docs/benchmarks.md, "Router relay capacity"). The rest of the router sees
only this module's types: UpstreamRequest, Answer and the errors below.

An idle keep-alive connection can be closed by the instance just as the router sends a request on it:
the request then fails before any byte of an answer (the peer's FIN: ServerDisconnectedError; its RST
or a write into a closed socket: ClientOSError or ClientConnectionResetError). That says nothing about
the instance, so such a failure on a *reused* connection is retried once on a new one, and only a
failure there counts against the instance. Whether the connection was reused is read from aiohttp's
trace signals for that request. (aiohttp itself retries an idempotent request, a GET, once that way:
that retry is counted too.)

    pooled   keep-alive, idle connections dropped after KEEPALIVE_EXPIRY_S: shorter than the instances'
             uvicorn keep-alive timeout, so the router lets go of an idle connection before the instance
             does and the race above stays rare
    fresh    no keep-alive: every request on a new connection (the retry)

    UpstreamError          an instance could not be reached, or broke off its answer
      ConnectFailed          refused or unreachable: it never got the request
      UpstreamTimeout        no answer (or no next byte of one) in time
        ConnectTimedOut        no connection in CONNECT_TIMEOUT_S: it never got the request either
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace, TracebackType
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
# Below the instances' uvicorn keep-alive timeout (uvicorn's default: 5 s; pdserve's instances keep idle
# connections longer): the side that closes an idle connection first must be the client.
KEEPALIVE_EXPIRY_S = 4.0


class UpstreamError(Exception):
    """An instance could not be reached, or broke off its answer; `kind`: the client's error class."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind or type(self).__name__


class ConnectFailed(UpstreamError):
    """Refused or unreachable: the instance never got the request."""


class UpstreamTimeout(UpstreamError):
    """No answer, or no next byte of one, in time."""


class ConnectTimedOut(UpstreamTimeout):
    """No connection in time: the instance never got the request."""


def upstream_error(error: BaseException) -> UpstreamError:
    """aiohttp's error (or a timeout inside it) as one of ours, its name kept in the message."""
    kind = type(error).__name__
    message = f"{kind}: {error}" if str(error) else kind
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return ConnectTimedOut(message, kind)
    if isinstance(error, asyncio.TimeoutError):  # aiohttp's ServerTimeoutError among them
        return UpstreamTimeout(message, kind)
    if isinstance(error, aiohttp.ClientConnectorError):
        return ConnectFailed(message, kind)
    return UpstreamError(message, kind)


def _stale(error: BaseException) -> bool:
    """A failure before any byte of an answer that a connection closed under us produces."""
    return isinstance(error, aiohttp.ClientConnectionError) and not isinstance(
        error, (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError)
    )


@dataclass
class UpstreamRequest:
    """One request to an instance; `timeout` (seconds): for each read instead of the client's request
    timeout (and for connecting, if shorter than CONNECT_TIMEOUT_S)."""

    method: str
    url: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None


class Answer:
    """An instance's answer: status and headers; the body read whole (`aread`) or as it comes."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = response.headers
        self.content = b""

    async def aread(self) -> bytes:
        try:
            self.content = await self._response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise upstream_error(e) from e
        return self.content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise upstream_error(e) from e

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    async def aclose(self) -> None:
        """Done with it: a whole answer's connection goes back to the pool; an answer cut short closes
        its connection, which tells the instance the client went away."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Upstream:
    """Sends requests to instances; a stale keep-alive connection is retried once on a new one."""

    def __init__(
        self,
        request_timeout: float,
        on_stale_retry: Callable[[], None] | None = None,
        headers: Mapping[str, str] | None = None,  # on every call: the router's own API key
    ) -> None:
        self.request_timeout = request_timeout
        self.on_stale_retry = on_stale_retry
        self.headers = dict(headers or {})
        self._sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession] | None = None

    def sessions(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        """(pooled, fresh): made on first use, inside the event loop that serves them."""
        if self._sessions is None:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_start.append(_connection_event("new"))
            trace.on_connection_reuseconn.append(_connection_event("reused"))
            pooled = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_EXPIRY_S)
            fresh = aiohttp.TCPConnector(limit=0, force_close=True)
            self._sessions = (
                aiohttp.ClientSession(connector=pooled, headers=self.headers, trace_configs=[trace]),
                aiohttp.ClientSession(connector=fresh, headers=self.headers),
            )
        return self._sessions

    def build_request(
        self,
        method: str,
        url: str,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamRequest:
        return UpstreamRequest(method, url, content, dict(headers or {}), timeout)

    async def send(self, request: UpstreamRequest, stream: bool = False) -> Answer:
        """The answer (headers only when `stream`, else read whole); a stale reused connection costs
        one quiet retry."""
        pooled, fresh = self.sessions()
        events: list[str] = []
        try:
            answer = await self._send(pooled, request, SimpleNamespace(events=events))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if not _stale(e) or not events or events[-1] == "new":
                raise upstream_error(e) from e  # no connection, or a new one broke: the instance's
            # debug only: the retries counter shows how often; a log line each would bury failures
            logger.debug("%s: reused connection was closed (%r); retrying", request.url, e)
            if self.on_stale_retry is not None:
                self.on_stale_retry()
            try:
                answer = await self._send(fresh, request, None)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise upstream_error(e) from e
        else:
            retried = len(events) > 1 and events[0] == "reused"  # aiohttp retried a GET itself
            if retried and self.on_stale_retry is not None:
                self.on_stale_retry()
        if not stream:
            try:
                await answer.aread()
            finally:
                await answer.aclose()
        return answer

    async def _send(
        self, session: aiohttp.ClientSession, request: UpstreamRequest, trace: SimpleNamespace | None
    ) -> Answer:
        read = self.request_timeout if request.timeout is None else request.timeout
        connect = min(read, CONNECT_TIMEOUT_S)
        response = await session.request(
            request.method,
            request.url,
            data=request.content,
            headers=request.headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read),
            trace_request_ctx=trace,
        )
        return Answer(response)

    async def get(self, url: str, timeout: float | None = None) -> Answer:
        """A whole GET answer; `timeout` (seconds) replaces the request timeout."""
        return await self.send(self.build_request("GET", url, timeout=timeout))

    async def aclose(self) -> None:
        if self._sessions is not None:
            for session in self._sessions:
                await session.close()
            self._sessions = None

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _connection_event(name: str) -> Callable[..., Any]:
    """A trace handler that notes, in the request's `events`, each connection it was given."""

    async def note(_session: Any, context: SimpleNamespace, _params: Any) -> None:
        request_ctx = context.trace_request_ctx
        if request_ctx is not None:
            request_ctx.events.append(name)

    return note

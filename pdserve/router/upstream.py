"""The router's HTTP client to its instances: pooled keep-alive connections, and the one retry that a
connection the instance had already closed earns.

An idle keep-alive connection can be closed by the instance just as the router sends a request on it:
the request then fails before any byte of an answer (the peer's FIN: RemoteProtocolError; its RST:
ReadError; a write into a closed socket: WriteError). That says nothing about the instance, so such a
failure on a *reused* connection is retried once on a new one, and only a failure there counts against
the instance. Whether the connection was reused, and whether answer headers had arrived, is read from
httpcore2's trace events for that request. The client is httpx2 (a fork of httpx): httpx 0.x's pool
(httpcore 1.0) does its bookkeeping in O(n^2) time in open connections on every request start and end,
which capped one router at ~2.5k relayed chunks/s (docs/benchmarks.md, "Router relay capacity").

    pooled   keep-alive, idle connections dropped after KEEPALIVE_EXPIRY_S: shorter than the instances'
             uvicorn keep-alive timeout, so the router lets go of an idle connection before the instance
             does and the race above stays rare
    fresh    no keep-alive: every request on a new connection (the retry)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import httpx2

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
# Below the instances' uvicorn keep-alive timeout (uvicorn's default: 5 s; pdserve's instances keep idle
# connections longer): the side that closes an idle connection first must be the client.
KEEPALIVE_EXPIRY_S = 4.0
MAX_KEEPALIVE = 256

# failures before any byte of an answer that a connection closed under us produces
_STALE_ERRORS = (httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError)
_NEW_CONNECTION = "connection.connect_tcp.started"
_ANSWER_BEGAN = "http11.receive_response_headers.complete"


class Upstream:
    """Sends requests to instances; a stale keep-alive connection is retried once on a new one."""

    def __init__(
        self,
        request_timeout: float,
        on_stale_retry: Callable[[], None] | None = None,
        headers: Mapping[str, str] | None = None,  # on every call: the router's own API key
    ) -> None:
        timeout = httpx2.Timeout(request_timeout, connect=CONNECT_TIMEOUT_S)
        pooled = httpx2.Limits(
            max_connections=None, max_keepalive_connections=MAX_KEEPALIVE, keepalive_expiry=KEEPALIVE_EXPIRY_S
        )
        self.pooled = httpx2.AsyncClient(timeout=timeout, limits=pooled, headers=headers, trust_env=False)
        fresh = httpx2.Limits(max_connections=None, max_keepalive_connections=0)
        self.fresh = httpx2.AsyncClient(timeout=timeout, limits=fresh, headers=headers, trust_env=False)
        self.on_stale_retry = on_stale_retry

    @property
    def headers(self) -> httpx2.Headers:
        """What every call carries (the router's own API key, when it has one)."""
        return self.pooled.headers

    def build_request(self, method: str, url: str, **kwargs: Any) -> httpx2.Request:
        return self.pooled.build_request(method, url, **kwargs)

    async def send(self, request: httpx2.Request, stream: bool = False) -> httpx2.Response:
        """The answer (headers only when `stream`); a stale reused connection costs one quiet retry."""
        events: list[str] = []

        async def trace(name: str, _info: dict[str, Any]) -> None:
            events.append(name)

        request.extensions["trace"] = trace
        try:
            return await self.pooled.send(request, stream=stream)
        except _STALE_ERRORS as e:
            if _NEW_CONNECTION in events or _ANSWER_BEGAN in events:
                raise  # a new connection broke, or the answer had begun: the instance's failure
            # debug only: the retries counter shows how often; a log line each would bury failures
            logger.debug("%s: reused connection was closed (%r); retrying", request.url, e)
        finally:
            request.extensions.pop("trace", None)
        if self.on_stale_retry is not None:
            self.on_stale_retry()
        return await self.fresh.send(request, stream=stream)

    async def get(self, url: str, timeout: float | None = None) -> httpx2.Response:
        """A whole GET answer; `timeout` (seconds) replaces the request timeout."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return await self.send(self.build_request("GET", url, **extra))

    async def aclose(self) -> None:
        await self.pooled.aclose()
        await self.fresh.aclose()

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

"""Choosing instances, opening upstream requests and retrying them, so the client never sees a retry.

Disaggregated, one request:

    client ──▶ router ── body + {"kv_transfer_params": {prefill_kv_addr, prefill_url,
                 ▲                                      expires, signature}} ──▶ DECODE
                 │                                                                  │ asks PREFILL
                 └─────────────────── SSE: first token ... [DONE] ◀─────────────────┘

The hand-off fields are signed with the cluster secret (cluster_secret.sign_handoff), so a decode
instance takes them from the router only, never from a client. Without a secret they go unsigned (and
decode instances refuse them): the router warns at startup.

Instances' 4xx answers pass through unchanged. A keep-alive connection that the instance closed just as
the request went out is retried on a new connection (upstream.py) and says nothing about the instance.
Retries, each at most once per instance: an instance that refuses the connection is marked down and the
request goes to another of its role; an answer "prefill_failed" before any token (HTTP 502, or an SSE
error event: see relay.py) goes to another prefill instance, once. An instance that dies mid-answer is
out of the rotation until its health check passes; not streaming, the client gets HTTP 502.
Every attempt carries the router's span as its `traceparent` header (observability/tracing.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from fastapi.responses import Response
from opentelemetry.trace import INVALID_SPAN, Span

from pdserve.cluster_secret import ClusterSecret, sign_handoff
from pdserve.observability import tracing
from pdserve.router.drain import InstanceDraining, check_not_draining
from pdserve.router.errors import RouterError, unavailable
from pdserve.router.instances import HealthPoller, Instance, Registry, Role
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Policy
from pdserve.router.relay import Relay, SSEResponse
from pdserve.router.sse import json_error_code
from pdserve.router.upstream import CONNECT_TIMEOUT_S, Upstream

logger = logging.getLogger(__name__)


# ---- one routed attempt -------------------------------------------------------------------------------


@dataclass
class Route:
    """Where one attempt goes: `target` gets the HTTP request; `prefill` (if any) computes the prompt."""

    target: Instance
    prefill: Instance | None
    tokens: int
    _prefill_open: bool = False
    _open: bool = False

    def begin(self) -> None:
        self.target.begin(self.tokens)
        self._open = True
        if self.prefill is not None:
            self.prefill.begin(self.tokens)
            self._prefill_open = True

    def prefill_done(self) -> None:
        if self.prefill is not None and self._prefill_open:
            self.prefill.end(self.tokens)
            self._prefill_open = False

    def release(self) -> None:
        self.prefill_done()
        if self._open:
            self.target.end(self.tokens)
            self._open = False

    def content(self, raw: bytes, body: dict[str, Any], secret: ClusterSecret | None) -> bytes:
        """Colocated: the client's bytes unchanged; disaggregated: the body plus kv_transfer_params,
        signed with `secret` (unsigned without one: decode instances refuse those)."""
        if self.prefill is None:
            return raw
        params: dict[str, Any] = {"prefill_kv_addr": self.prefill.kv_addr, "prefill_url": self.prefill.url}
        if secret is not None:
            params = sign_handoff(secret, params)
        return json.dumps({**body, "kv_transfer_params": params}).encode()


@dataclass
class Tries:
    """What one client request has tried: the instances that refused, whether prefill was retried."""

    targets: set[str] = field(default_factory=set)
    prefills: set[str] = field(default_factory=set)
    prefill_retried: bool = False


@dataclass
class Call:
    """One client request on its way through the router."""

    path: str
    raw: bytes
    body: dict[str, Any]
    authorization: str | None = None  # the client's header, passed on: instances may want the key too
    arrival: float = field(default_factory=time.monotonic)
    tries: Tries = field(default_factory=Tries)
    span: Span = field(default_factory=lambda: INVALID_SPAN)  # the router's span (tracing.py)

    @property
    def tokens(self) -> int:
        """A rough prompt size (4 characters a token), only to weigh requests against each other."""
        prompt = self.body.get("prompt", self.body.get("messages", ""))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return len(json.dumps(prompt)) // 4 + 1


# ---- the proxy --------------------------------------------------------------------------------------------


class Proxy:
    """Chooses instances, sends attempts, retries what may be retried, passes answers through."""

    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        metrics: RouterMetrics,
        poller: HealthPoller,
        client: Upstream,
        secret: ClusterSecret | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        self.poller = poller
        self.client = client
        self.secret = secret
        if secret is None and not registry.colocated:
            logger.warning(
                "no cluster secret (--cluster-secret-file or $PDSERVE_CLUSTER_SECRET): the hand-off "
                "fields go to decode instances unsigned, and instances that check them refuse every "
                "request; give the router the secret its instances were started with"
            )

    def choose(self, role: Role, exclude: Iterable[str], body: dict[str, Any] | None = None) -> Instance:
        candidates = self.registry.healthy(role, exclude)
        if not candidates:
            raise unavailable(self.registry.why_none(role))
        return self.policy.choose(candidates, role, body)

    def route(self, call: Call) -> Route:
        if self.registry.colocated:
            return Route(self.choose("both", call.tries.targets, call.body), None, call.tokens)
        target = self.choose("decode", call.tries.targets, call.body)
        return Route(target, self.choose("prefill", call.tries.prefills, call.body), call.tokens)

    async def open(self, call: Call) -> tuple[Route, httpx.Response]:
        """Send one attempt; an instance that refuses the connection is marked down and another tried."""
        while True:
            route = self.route(call)
            route.begin()
            for instance in (route.target, route.prefill):
                if instance is not None:
                    self.metrics.count_routed(instance)
            url = f"{route.target.url}{call.path}"
            headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
            if call.authorization is not None:
                headers["authorization"] = call.authorization
            headers.update(tracing.headers(call.span))  # the instance's span joins the router's trace
            request = self.client.build_request(
                "POST", url, content=route.content(call.raw, call.body, self.secret), headers=headers
            )
            try:
                response = await self.client.send(request, stream=True)
                await check_not_draining(response)  # a draining instance: as if it refused
                return route, response
            except (httpx.ConnectError, httpx.ConnectTimeout, InstanceDraining) as e:
                route.release()
                route.target.mark_down(f"refused a connection: {str(e) or type(e).__name__}")
                call.tries.targets.add(route.target.url)
                reason = "instance_draining" if isinstance(e, InstanceDraining) else "connect_failed"
                self.metrics.count_error(reason)
                self.metrics.retries.labels(reason=reason).inc()
            except httpx.HTTPError as e:
                route.release()
                raise self.instance_failed(route.target, e) from None
            except BaseException:  # cancelled: the client went away
                route.release()
                raise

    def instance_failed(self, instance: Instance, error: Exception) -> RouterError:
        """An instance broke off an answer: out of the rotation until its health check passes."""
        if isinstance(error, httpx.TimeoutException):
            message = f"instance {instance.url} did not answer in time"
            return RouterError(504, message, "instance_timeout")
        instance.mark_down(f"broke off an answer: {type(error).__name__}")
        self.poller.check_soon(instance)
        message = f"instance {instance.url} failed while answering ({type(error).__name__})"
        return RouterError(502, message, "instance_failed")

    def retry_prefill(self, call: Call, route: Route, code: str | None) -> bool:
        """After "prefill_failed": True (and the failed instance excluded) if another prefill may try."""
        if code != "prefill_failed" or route.prefill is None:
            return False
        self.metrics.count_error("prefill_failed")
        self.poller.check_soon(route.prefill)
        call.tries.prefills.add(route.prefill.url)
        if call.tries.prefill_retried or not self.registry.healthy("prefill", call.tries.prefills):
            return False
        call.tries.prefill_retried = True
        self.metrics.retries.labels(reason="prefill_failed").inc()
        logger.warning("prefill on %s failed; retrying on another prefill instance", route.prefill.url)
        return True

    async def read(self, route: Route, response: httpx.Response) -> bytes:
        """A whole (non-stream) answer; the route is released however it ends."""
        try:
            return await response.aread()
        except httpx.HTTPError as e:
            raise self.instance_failed(route.target, e) from None
        finally:
            route.release()
            with anyio.CancelScope(shield=True):
                await response.aclose()

    def passthrough(self, status: int, content: bytes, response: httpx.Response) -> Response:
        if status >= 400:
            self.metrics.count_error(f"upstream_{json_error_code(content) or status}")
        media_type = response.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media_type)

    async def unary(self, call: Call) -> Response:
        while True:
            route, response = await self.open(call)
            content = await self.read(route, response)
            if self.retry_prefill(call, route, json_error_code(content)):
                continue
            self.metrics.e2e.observe(time.monotonic() - call.arrival)
            return self.passthrough(response.status_code, content, response)

    async def stream(self, call: Call) -> Response:
        while True:
            route, response = await self.open(call)
            if response.status_code == 200:
                return SSEResponse(Relay(self, call, route, response))
            content = await self.read(route, response)
            if not self.retry_prefill(call, route, json_error_code(content)):
                return self.passthrough(response.status_code, content, response)

    async def models(self) -> Response:
        roles: tuple[Role, ...] = ("both",) if self.registry.colocated else ("decode", "prefill")
        for instance in [i for role in roles for i in self.registry.healthy(role)]:
            try:
                answer = await self.client.get(f"{instance.url}/v1/models", timeout=CONNECT_TIMEOUT_S)
            except httpx.HTTPError as e:
                instance.mark_down(f"GET /v1/models failed: {type(e).__name__}")
                continue
            media_type = answer.headers.get("content-type", "application/json")
            return Response(answer.content, status_code=answer.status_code, media_type=media_type)
        raise unavailable(self.registry.why_none(roles[0]))

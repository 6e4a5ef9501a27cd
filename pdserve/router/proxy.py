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
An instance that refuses the connection, or answers 503 "instance_draining", is marked down and the
request goes to another of its role (no retry budget spent). Every other retry spends one of the
request's `max_resumes`: "prefill_failed" (HTTP 502, or an SSE error event) goes to another prefill
instance; an instance that breaks off, stalls or answers one of resume.RESUMABLE_CODES is out of the
rotation until its health check passes, and the request goes to another pair: a whole non-streamed
request again, a stream resumed where it broke off (relay.py). Budget spent: the client gets the error.
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
from fastapi.responses import Response
from opentelemetry.trace import INVALID_SPAN, Span

from pdserve.cluster_secret import ClusterSecret, sign_handoff
from pdserve.observability import tracing
from pdserve.router.errors import RouterError, unavailable
from pdserve.router.instances import HealthPoller, Instance, Registry, Role
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Policy
from pdserve.router.relay import Relay, SSEResponse
from pdserve.router.resume import PREFILL_CODES, RESUMABLE_CODES, RESUMABLE_HEADER
from pdserve.router.sse import json_error_code
from pdserve.router.upstream import (
    CONNECT_TIMEOUT_S,
    Answer,
    ConnectFailed,
    ConnectTimedOut,
    Upstream,
    UpstreamError,
    UpstreamRequest,
    UpstreamTimeout,
)
from pdserve.router.workload import Sample

_TOKENIZE_TIMEOUT_S = 60.0  # a long prompt through a chat template on a busy instance

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

    def content(self, call: Call, secret: ClusterSecret | None) -> bytes:
        """Colocated: the client's bytes unchanged (plus `resume`, when resuming); disaggregated: the
        body plus kv_transfer_params, signed with `secret` (unsigned without one: decode instances
        refuse those)."""
        body = call.body if call.resume is None else {**call.body, "resume": call.resume}
        if self.prefill is None:
            return call.raw if call.resume is None else json.dumps(body).encode()
        params: dict[str, Any] = {"prefill_kv_addr": self.prefill.kv_addr, "prefill_url": self.prefill.url}
        if secret is not None:
            params = sign_handoff(secret, params)
        return json.dumps({**body, "kv_transfer_params": params}).encode()

    def describe(self) -> str:
        if self.prefill is None:
            return self.target.url
        return f"decode {self.target.url} + prefill {self.prefill.url}"


@dataclass
class Tries:
    """What one client request has tried: the instances that failed it, and the retries and resumes
    spent (against the router's max_resumes)."""

    targets: set[str] = field(default_factory=set)
    prefills: set[str] = field(default_factory=set)
    spent: int = 0


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
    resume: dict[str, Any] | None = None  # the `resume` field the next attempt carries (relay.py)
    sample: Sample | None = None  # where the answer's output length goes (workload.py)

    @property
    def resumable(self) -> bool:
        """A stream of one choice: the instance marks its events with token ids (resume.py)."""
        return self.body.get("stream") is True and self.body.get("n", 1) in (1, None)

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
        max_resumes: int = 2,
        stall_timeout: float = 30.0,
    ) -> None:
        self.registry = registry
        self.max_resumes = max_resumes  # retries and resumes of one request, all told
        self.stall_timeout = stall_timeout  # a stream with no event this long (after a token) resumes
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

    async def open(self, call: Call) -> tuple[Route, Answer]:
        """Send one attempt; an instance that refuses the connection or is draining is marked down and
        another tried."""
        while True:
            route = self.route(call)
            route.begin()
            for instance in (route.target, route.prefill):
                if instance is not None:
                    self.metrics.count_routed(instance)
            try:
                response = await self.client.send(self.request(call, route), stream=True)
                if not await self.draining(response):
                    return route, response
                why, kind = "is draining", "instance_draining"
            except (ConnectFailed, ConnectTimedOut) as e:
                why, kind = f"refused a connection: {e}", "connect_failed"
            except UpstreamError as e:  # it took the request, then broke off before answering
                route.release()
                failure = self.instance_failed(route.target, e)
                if self.may_retry(call, route, failure.code):  # nothing reached the client: whole
                    logger.warning("%s; retrying the request on another instance", failure.message)
                    continue
                raise failure from None
            except BaseException:  # cancelled: the client went away
                route.release()
                raise
            route.release()
            route.target.mark_down(why)
            call.tries.targets.add(route.target.url)
            self.metrics.count_error(kind)
            self.metrics.retries.labels(reason=kind).inc()

    def request(self, call: Call, route: Route) -> UpstreamRequest:
        url = f"{route.target.url}{call.path}"
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if call.authorization is not None:
            headers["authorization"] = call.authorization
        if call.resumable:
            headers[RESUMABLE_HEADER] = "1"
        headers.update(tracing.headers(call.span))  # the instance's span joins the router's trace
        content = route.content(call, self.secret)
        return self.client.build_request("POST", url, content=content, headers=headers)

    async def draining(self, response: Answer) -> bool:
        """A 503 "instance_draining" (read and closed here): the instance takes no new request."""
        if response.status_code != 503:
            return False
        try:
            content = await response.aread()
        except UpstreamError:
            content = b""
        if json_error_code(content) == "instance_draining":
            await response.aclose()
            return True
        return False

    def instance_failed(self, instance: Instance, error: Exception) -> RouterError:
        """An instance broke off an answer: out of the rotation until its health check passes."""
        if isinstance(error, UpstreamTimeout):
            message = f"instance {instance.url} did not answer in time"
            return RouterError(504, message, "instance_timeout")
        kind = error.kind if isinstance(error, UpstreamError) else type(error).__name__
        self.take_out(instance, f"broke off an answer: {kind}")
        message = f"instance {instance.url} failed while answering ({kind})"
        return RouterError(502, message, "instance_failed")

    def take_out(self, instance: Instance, why: str) -> None:
        """Out of the rotation until its health check (asked for now) passes."""
        instance.mark_down(why)
        self.poller.check_soon(instance)

    def may_retry(self, call: Call, route: Route, code: str | None) -> bool:
        """After a failure with `code`: True if the request may go to another pair (the failed instance
        excluded: the prefill after "prefill_failed"/"kv_timeout", else the target), spending one of
        its max_resumes; a draining prefill took no part in it, so trying another costs nothing."""
        if code not in RESUMABLE_CODES:
            return False
        self.metrics.count_error(code)
        free = code == "prefill_draining"
        if code in PREFILL_CODES and route.prefill is not None:
            if free:
                route.prefill.mark_down("is draining")
            self.poller.check_soon(route.prefill)
            call.tries.prefills.add(route.prefill.url)
            spare = self.registry.healthy("prefill", call.tries.prefills)
        else:
            self.take_out(route.target, f"failed a request: {code}")
            call.tries.targets.add(route.target.url)
            spare = self.registry.healthy(route.target.role, call.tries.targets)
        if not spare or (call.tries.spent >= self.max_resumes and not free):
            return False
        call.tries.spent += 0 if free else 1
        self.metrics.retries.labels(reason=code).inc()
        return True

    async def read(self, route: Route, response: Answer) -> bytes:
        """A whole (non-stream) answer; the route is released however it ends."""
        try:
            return await response.aread()
        except UpstreamError as e:
            raise self.instance_failed(route.target, e) from None
        finally:
            route.release()
            with anyio.CancelScope(shield=True):
                await response.aclose()

    def passthrough(self, status: int, content: bytes, response: Answer) -> Response:
        if status >= 400:
            self.metrics.count_error(f"upstream_{json_error_code(content) or status}")
        media_type = response.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media_type)

    async def unary(self, call: Call) -> Response:
        """A whole answer; one that failed in a way another pair may not is retried there whole."""
        while True:
            route, response = await self.open(call)
            try:
                content = await self.read(route, response)
            except RouterError as e:
                if self.may_retry(call, route, e.code):
                    logger.warning("%s; retrying the request on another instance", e.message)
                    continue
                raise
            code = json_error_code(content) if response.status_code >= 500 else None
            if self.may_retry(call, route, code):
                logger.warning("%s answered %s; retrying the request elsewhere", route.describe(), code)
                continue
            self.metrics.e2e.observe(time.monotonic() - call.arrival)
            return self.passthrough(response.status_code, content, response)

    async def stream(self, call: Call) -> Response:
        while True:
            route, response = await self.open(call)
            if response.status_code == 200:
                return SSEResponse(Relay(self, call, route, response))
            content = await self.read(route, response)
            code = json_error_code(content) if response.status_code >= 500 else None
            if not self.may_retry(call, route, code):
                return self.passthrough(response.status_code, content, response)
            logger.warning("%s answered %s; retrying the request elsewhere", route.describe(), code)

    async def models(self) -> Response:
        return await self.any_instance("GET", "/v1/models")

    async def any_instance(
        self, method: str, path: str, content: bytes | None = None, authorization: str | None = None
    ) -> Response:
        """What needs only the model, not a pair (/v1/models, /tokenize, /detokenize): the first healthy
        instance that answers, its answer as it is; one that cannot be reached is marked down."""
        roles: tuple[Role, ...] = ("both",) if self.registry.colocated else ("decode", "prefill")
        headers = {"content-type": "application/json"} if content is not None else {}
        timeout = _TOKENIZE_TIMEOUT_S if content else CONNECT_TIMEOUT_S
        if authorization is not None:
            headers["authorization"] = authorization
        for instance in [i for role in roles for i in self.registry.healthy(role)]:
            request = self.client.build_request(
                method, f"{instance.url}{path}", content=content, headers=headers, timeout=timeout
            )
            try:
                answer = await self.client.send(request)
            except UpstreamError as e:
                instance.mark_down(f"{method} {path} failed: {e.kind}")
                continue
            media_type = answer.headers.get("content-type", "application/json")
            return Response(answer.content, status_code=answer.status_code, media_type=media_type)
        raise unavailable(self.registry.why_none(roles[0]))

"""The router's HTTP front: OpenAI endpoints proxied to instances, with retries that the client never sees.

    POST /v1/chat/completions, /v1/completions   -> the decode instance (+ kv_transfer_params naming the
                                                    chosen prefill instance), or one colocated instance
    GET  /v1/models                               -> a healthy instance's answer
    GET  /health, /metrics, /router/instances     -> the router's own view

Disaggregated, one request:

    client ──▶ router ── body + {"kv_transfer_params": {prefill_kv_addr, prefill_url}} ──▶ DECODE
                 ▲                                                                    │ asks PREFILL
                 └──────────────────── SSE: first token ... [DONE] ◀──────────────────┘

The router parses the body only to check that it is a JSON object (400 otherwise); everything else is
the instance's to validate, and its 4xx answers pass through unchanged. Retries, each at most once per
instance: an instance that refuses the connection is marked down and the request goes to another of
its role; an answer "prefill_failed" before any token (HTTP 502, or an SSE error event; stream events
are held back until the first one that carries a token, so a retry is invisible) goes to another
prefill instance, once. An instance that dies mid-answer ends the stream with an "instance_failed"
error event and [DONE] (HTTP 502 when not streaming). A client that goes away closes the upstream
request, so the instance aborts it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pdserve.router.instances import HealthPoller, Instance, Registry, Role
from pdserve.router.metrics import CONTENT_TYPE, RouterMetrics
from pdserve.router.policies import POLICIES, Policy, make_policy

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
_CONNECT_TIMEOUT = 3.0


@dataclass(frozen=True)
class RouterConfig:
    """One router: its instances (prefill + decode, or colocated), its HTTP front and its policy."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "round_robin"
    api_key: str | None = None
    decode_max_queued: int = 64
    health_interval: float = 1.0
    health_timeout: float = 1.0
    request_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.instances and (self.prefill or self.decode):
            raise ValueError("give either --instance (colocated) or --prefill and --decode, not both")
        if not self.instances and not (self.prefill and self.decode):
            raise ValueError("give at least one --prefill and one --decode instance, or --instance")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if min(self.health_interval, self.health_timeout, self.request_timeout) <= 0:
            raise ValueError("intervals and timeouts must be positive")
        if self.decode_max_queued < 0:
            raise ValueError("--decode-max-queued must be at least 0")


# ---- errors, in OpenAI's shape --------------------------------------------------------------------------


class RouterError(Exception):
    """An answer the router gives itself; `code` is also its kind in the errors counter."""

    def __init__(self, status: int, message: str, code: str, type_: str = "server_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def unavailable(message: str) -> RouterError:
    return RouterError(503, message, "no_instance", "service_unavailable_error")


def sse_event(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


# ---- reading SSE events -----------------------------------------------------------------------------------


async def sse_events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response body cut into whole events (each ending in a blank line)."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk.replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            yield buffer[: end + 2]
            buffer = buffer[end + 2 :]
    if buffer.strip():
        yield buffer if buffer.endswith(b"\n\n") else buffer.rstrip(b"\n") + b"\n\n"


def event_data(event: bytes) -> Any:
    """The event's data as JSON; "[DONE]" for the end marker; None without (valid JSON) data."""
    payload = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")).strip()
    if payload == b"[DONE]":
        return "[DONE]"
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


def error_code(data: Any) -> str | None:
    """The `code` of an OpenAI error object (a whole answer or an SSE event), else None."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
        return str(code) if code is not None else "error"
    return None


def carries_token(data: Any) -> bool:
    """False only for events that say nothing yet: the role preamble, comments, empty deltas."""
    if not isinstance(data, dict) or "error" in data:
        return data is not None
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return True  # the usage chunk and anything unexpected count as content
    for choice in choices:
        if not isinstance(choice, dict):
            return True
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        if (
            choice.get("text")
            or delta.get("content")
            or choice.get("finish_reason")
            or choice.get("logprobs")
        ):
            return True
    return False


def _json_error_code(content: bytes) -> str | None:
    try:
        return error_code(json.loads(content))
    except ValueError:
        return None


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

    def content(self, raw: bytes, body: dict[str, Any]) -> bytes:
        """Colocated: the client's bytes unchanged; disaggregated: the body plus kv_transfer_params."""
        if self.prefill is None:
            return raw
        params = {"prefill_kv_addr": self.prefill.kv_addr, "prefill_url": self.prefill.url}
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
    arrival: float = field(default_factory=time.monotonic)
    tries: Tries = field(default_factory=Tries)

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
        client: httpx.AsyncClient,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        self.poller = poller
        self.client = client

    def choose(self, role: Role, exclude: Iterable[str]) -> Instance:
        candidates = self.registry.healthy(role, exclude)
        if not candidates:
            raise unavailable(self.registry.why_none(role))
        return self.policy.choose(candidates, role)

    def route(self, call: Call) -> Route:
        if self.registry.colocated:
            return Route(self.choose("both", call.tries.targets), None, call.tokens)
        target = self.choose("decode", call.tries.targets)
        return Route(target, self.choose("prefill", call.tries.prefills), call.tokens)

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
            request = self.client.build_request(
                "POST", url, content=route.content(call.raw, call.body), headers=headers
            )
            try:
                return route, await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                route.release()
                route.target.mark_down(f"refused a connection: {str(e) or type(e).__name__}")
                call.tries.targets.add(route.target.url)
                self.metrics.count_error("connect_failed")
                self.metrics.retries.labels(reason="connect_failed").inc()
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
            self.metrics.count_error(f"upstream_{_json_error_code(content) or status}")
        media_type = response.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media_type)

    async def unary(self, call: Call) -> Response:
        while True:
            route, response = await self.open(call)
            content = await self.read(route, response)
            if self.retry_prefill(call, route, _json_error_code(content)):
                continue
            self.metrics.e2e.observe(time.monotonic() - call.arrival)
            return self.passthrough(response.status_code, content, response)

    async def stream(self, call: Call) -> Response:
        while True:
            route, response = await self.open(call)
            if response.status_code == 200:
                return SSEResponse(Relay(self, call, route, response))
            content = await self.read(route, response)
            if not self.retry_prefill(call, route, _json_error_code(content)):
                return self.passthrough(response.status_code, content, response)

    async def models(self) -> Response:
        roles: tuple[Role, ...] = ("both",) if self.registry.colocated else ("decode", "prefill")
        for instance in [i for role in roles for i in self.registry.healthy(role)]:
            try:
                answer = await self.client.get(f"{instance.url}/v1/models", timeout=_CONNECT_TIMEOUT)
            except httpx.HTTPError as e:
                instance.mark_down(f"GET /v1/models failed: {type(e).__name__}")
                continue
            media_type = answer.headers.get("content-type", "application/json")
            return Response(answer.content, status_code=answer.status_code, media_type=media_type)
        raise unavailable(self.registry.why_none(roles[0]))


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
        if _json_error_code(content) is None:
            return (
                sse_event(error_body(f"instance answered HTTP {status}", "server_error", "instance_failed"))
                + DONE
            )
        self.proxy.metrics.count_error(f"upstream_{_json_error_code(content)}")
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


# ---- the app ----------------------------------------------------------------------------------------------


async def parse_body(raw: Request) -> tuple[bytes, dict[str, Any]]:
    content = await raw.body()
    try:
        body = json.loads(content)
    except ValueError as e:
        raise RouterError(
            400, f"request body is not valid JSON: {e}", "invalid_json", "invalid_request_error"
        ) from None
    if not isinstance(body, dict):
        raise RouterError(400, "request body must be a JSON object", "invalid_json", "invalid_request_error")
    return content, body


async def until_disconnect(raw: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, cancelling it (so its upstream request closes) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and await raw.is_disconnected():
                raise RouterError(499, "client disconnected", "client_disconnected", "invalid_request_error")
        return task.result()
    finally:
        task.cancel()


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RouterError(
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                "invalid_api_key",
                "authentication_error",
            )

    return check


def _v1_router(app: FastAPI, api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(api_key))])

    async def proxied(raw: Request, path: str) -> Response:
        content, body = await parse_body(raw)
        call = Call(path, content, body)
        proxy: Proxy = app.state.proxy
        if body.get("stream") is True:
            return await until_disconnect(raw, proxy.stream(call))
        return await until_disconnect(raw, proxy.unary(call))

    @router.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await proxied(raw, "/v1/chat/completions")

    @router.post("/completions")
    async def completions(raw: Request) -> Response:
        return await proxied(raw, "/v1/completions")

    @router.get("/models")
    async def models() -> Response:
        proxy: Proxy = app.state.proxy
        return await proxy.models()

    return router


def _ops_router(app: FastAPI, registry: Registry, metrics: RouterMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        missing = [registry.why_none(r) for r in registry.needed_roles if not registry.healthy(r)]
        if missing:
            raise unavailable("; ".join(missing))
        counts = {r: len(registry.healthy(r)) for r in registry.needed_roles}
        return JSONResponse({"status": "ok", "healthy": counts})

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        proxy: Proxy = app.state.proxy
        await metrics.scrape_kv(proxy.client, registry.instances, proxy.poller.timeout)
        metrics.set_state(registry)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/router/instances")
    async def instances() -> Response:
        return JSONResponse({"instances": [i.describe() for i in registry.instances]})

    return router


def _install_error_handlers(app: FastAPI, metrics: RouterMetrics) -> None:
    async def router_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)
        metrics.count_error(exc.code)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = error_body(str(exc.detail), "invalid_request_error", code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def internal(_: Request, exc: Exception) -> Response:
        logger.error("internal error", exc_info=exc)
        metrics.count_error("internal_error")
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), 500)

    app.add_exception_handler(RouterError, router_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


def build_app(config: RouterConfig) -> FastAPI:
    """The router app; its HTTP client and health poller live as long as the app is served."""
    registry = Registry.build(config.prefill, config.decode, config.instances)
    metrics = RouterMetrics()
    policy = make_policy(config.policy, config.decode_max_queued)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.request_timeout, connect=_CONNECT_TIMEOUT)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            poller = HealthPoller(registry, client, config.health_interval, config.health_timeout)
            app.state.proxy = Proxy(registry, policy, metrics, poller, client)
            await poller.check_all()
            poller.start()
            try:
                yield
            finally:
                await poller.stop()

    app = FastAPI(title="pdserve router", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.metrics = metrics
    _install_error_handlers(app, metrics)
    app.include_router(_v1_router(app, config.api_key))
    app.include_router(_ops_router(app, registry, metrics))
    return app


def run_router(config: RouterConfig, log_level: str = "info") -> None:
    """Serve the router until SIGTERM/SIGINT."""
    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    app = build_app(config)
    modes = (
        f"{len(config.instances)} colocated"
        if config.instances
        else (f"{len(config.prefill)} prefill + {len(config.decode)} decode")
    )
    logger.info(
        "router at http://%s:%d/v1 in front of %s instances (%s)",
        config.host,
        config.port,
        modes,
        config.policy,
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )

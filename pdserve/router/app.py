"""The router's HTTP front: OpenAI endpoints proxied to instances, the router's own view, its errors.

    POST /v1/chat/completions, /v1/completions   -> the decode instance (+ kv_transfer_params naming the
                                                    chosen prefill instance), or one colocated instance
    GET  /v1/models, POST /tokenize, /detokenize  -> a healthy instance's answer (the router has no
                                                    tokenizer: any instance's is the model's)
    GET  /health, /metrics, /router/instances     -> the router's own view
    GET  /pd/workload                             -> the workload it observed (router/workload.py)

The router parses the body only to check that it is a JSON object (400 otherwise); everything else is
the instance's to validate. With an API key, every route but /health wants `Authorization: Bearer <key>`
(401 otherwise; /metrics too, unless metrics_public; the API docs are not served), and the router sends
that key on its own calls to the instances (polls, proxied requests: instances started with the same
key). Without one, a client's Authorization header goes on to the instance. Body size, trailing slashes
and malformed HTTP are pdserve/http_edge's.
Where a request goes and its retries are proxy.py's, relaying a stream relay.py's. A client that goes
away closes the upstream request, so the instance aborts it. The router's own errors, 404/405 and
internal errors are answered in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.cluster_secret import ClusterSecret
from pdserve.http_edge.auth import API_DOCS_OFF, REFUSAL, bearer_header, require_api_key
from pdserve.http_edge.body_limit import BodyLimit
from pdserve.http_edge.draining import DrainingServer
from pdserve.http_edge.limits import DEFAULT_MAX_REQUEST_BYTES
from pdserve.http_edge.slashes import TrailingSlash
from pdserve.http_edge.uvicorn_setup import uvicorn_config
from pdserve.observability import tracing
from pdserve.registry.dns import is_dns_url, parse_dns_url
from pdserve.registry.redis_keys import check_registry_url, redact
from pdserve.router.drain import DEFAULT_DRAIN_TIMEOUT_S, install_drain
from pdserve.router.errors import RouterError, error_body, unavailable
from pdserve.router.instances import HealthPoller, Registry, Role
from pdserve.router.membership import MembershipWatcher, membership_sources
from pdserve.router.metrics import CONTENT_TYPE, RouterMetrics
from pdserve.router.policies import DEFAULT_IMBALANCE, POLICIES, make_policy
from pdserve.router.proxy import Call, Proxy
from pdserve.router.relay import SSEResponse
from pdserve.router.upstream import Upstream
from pdserve.router.workload import Recommender, WorkloadRecorder

logger = logging.getLogger(__name__)


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
    cache_imbalance: float = DEFAULT_IMBALANCE  # cache_aware: see policies.py
    health_interval: float = 1.0
    health_timeout: float = 1.0
    request_timeout: float = 600.0
    cluster_secret: ClusterSecret | None = None  # signs the hand-off fields sent to decode instances
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body: 413, before it is read whole
    metrics_public: bool = False  # /metrics without the API key
    registry: str | None = None  # redis://HOST:PORT[/DB]: instances join and leave through it
    otlp_traces_endpoint: str | None = None  # OTLP/HTTP collector for OpenTelemetry spans
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S  # SIGTERM: how long open relays get (router/drain.py)
    max_resumes: int = 2  # retries and resumes of one request after its instance failed (proxy.py)
    stall_timeout: float = 30.0  # a stream silent this long after a token is resumed elsewhere
    plan_profile: str | None = None  # a `pdserve profile`: export recommended instance counts (workload.py)
    plan_slo: str = ""  # the SLOs those counts are for, e.g. ttft=2000,tpot=50

    def __post_init__(self) -> None:
        if self.instances and (self.prefill or self.decode):
            raise ValueError("give either --instance (colocated) or --prefill and --decode, not both")
        if not self.registry and not self.instances and not (self.prefill and self.decode):
            raise ValueError(
                "give at least one --prefill and one --decode instance, --instance, or --registry"
            )
        if self.registry is not None:
            check_registry_url(self.registry)
        for url in (*self.prefill, *self.decode, *self.instances):
            if is_dns_url(url):
                parse_dns_url(url)
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if min(self.health_interval, self.health_timeout, self.request_timeout, self.stall_timeout) <= 0:
            raise ValueError("intervals and timeouts must be positive")
        if self.max_resumes < 0:
            raise ValueError("--max-resumes must be at least 0")
        if self.decode_max_queued < 0:
            raise ValueError("--decode-max-queued must be at least 0")
        if self.max_request_bytes < 1:
            raise ValueError("--max-request-bytes must be positive")
        if self.cache_imbalance < 1:
            raise ValueError("--cache-imbalance must be at least 1")

    @property
    def instance_headers(self) -> dict[str, str]:
        """Headers on every call the router makes to an instance: its API key, if it has one."""
        return bearer_header(self.api_key)


async def parse_body(raw: Request) -> tuple[bytes, dict[str, Any]]:
    content = await raw.body()
    try:
        body = json.loads(content)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
        raise RouterError(
            400, f"request body is not valid JSON: {e}", "invalid_json", "invalid_request_error"
        ) from None
    if not isinstance(body, dict):
        raise RouterError(400, "request body must be a JSON object", "invalid_json", "invalid_request_error")
    return content, body


async def until_disconnect(raw: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, cancelling it (so its upstream request closes) if the client goes away. A stream
    that became ready just as the client left is closed here, since no server will ever run it."""
    task = asyncio.ensure_future(work)
    handed = False
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and await raw.is_disconnected():
                raise RouterError(499, "client disconnected", "client_disconnected", "invalid_request_error")
        handed = True
        return task.result()
    finally:
        task.cancel()
        ready = not handed and task.done() and not task.cancelled() and task.exception() is None
        response = task.result() if ready else None
        if isinstance(response, SSEResponse):
            await response.relay.close()


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    return require_api_key(
        api_key, lambda: RouterError(401, REFUSAL, "invalid_api_key", "authentication_error")
    )


def _v1_router(app: FastAPI, api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1")

    async def proxied(raw: Request, path: str) -> Response:
        content, body = await parse_body(raw)
        # with a key of its own the router sends that (its client's default header); else the client's
        authorization = None if api_key else raw.headers.get("authorization")
        span = tracing.start("router.request", tracing.incoming(raw.headers), path=path)
        call = Call(path, content, body, authorization, span=span)
        sample = call.sample = app.state.workload.record(call.tokens)
        proxy: Proxy = app.state.proxy
        work = proxy.stream(call) if body.get("stream") is True else proxy.unary(call)
        try:
            response = await until_disconnect(raw, work)
        except BaseException:
            span.end()
            raise
        if not isinstance(response, SSEResponse):  # a relayed stream ends its span (and sample) itself
            sample.answered(response.body)
            span.end()
        return response

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


def _tokenizer_router(app: FastAPI, api_key: str | None) -> APIRouter:
    router = APIRouter()

    async def forwarded(raw: Request, path: str) -> Response:
        content, _ = await parse_body(raw)
        proxy: Proxy = app.state.proxy
        return await proxy.any_instance(
            "POST", path, content, None if api_key else raw.headers.get("authorization")
        )

    @router.post("/tokenize")
    async def tokenize(raw: Request) -> Response:
        return await forwarded(raw, "/tokenize")

    @router.post("/detokenize")
    async def detokenize(raw: Request) -> Response:
        return await forwarded(raw, "/detokenize")

    return router


def _health_router(registry: Registry) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        missing = [registry.why_none(r) for r in registry.needed_roles if not registry.healthy(r)]
        if missing:  # answered, not raised: a health check is no client request for the errors counter
            return unavailable("; ".join(missing)).response()
        counts = {r: len(registry.healthy(r)) for r in registry.needed_roles}
        return JSONResponse({"status": "ok", "healthy": counts})

    return router


def _metrics_router(
    app: FastAPI, registry: Registry, metrics: RouterMetrics, recommender: Recommender | None
) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        proxy: Proxy = app.state.proxy
        await metrics.scrape_kv(proxy.client, registry.instances, proxy.poller.timeout)
        metrics.set_state(registry)
        workload = app.state.workload.snapshot()
        metrics.set_workload(workload, recommender.refresh(workload) if recommender else None)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/pd/workload")
    async def observed_workload() -> Response:
        return JSONResponse(app.state.workload.snapshot())

    return router


def _instances_router(registry: Registry) -> APIRouter:
    router = APIRouter()

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


def _membership_watcher(
    config: RouterConfig, registry: Registry, metrics: RouterMetrics, poller: HealthPoller
) -> MembershipWatcher | None:
    """What follows dns:// names and the registry; None when every instance is a fixed URL."""
    lists: tuple[tuple[Role, tuple[str, ...]], ...] = (
        ("prefill", config.prefill),
        ("decode", config.decode),
        ("both", config.instances),
    )
    up = None
    if config.registry is not None:
        from prometheus_client import Gauge

        up = Gauge(
            "pdserve_registry_up", "1: the registry answered the latest read", registry=metrics.registry
        )
    sources = membership_sources(lists, config.registry, lambda ok: up.set(int(ok)) if up else None)
    return MembershipWatcher(registry, sources, poller.check_soon) if sources else None


def build_app(config: RouterConfig) -> FastAPI:
    """The router app; its HTTP client and health poller live as long as the app is served."""
    registry = Registry.build(config.prefill, config.decode, config.instances)
    metrics = RouterMetrics()
    policy = make_policy(config.policy, config.decode_max_queued, imbalance=config.cache_imbalance)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stale = functools.partial(metrics.count_retry, "stale_connection")
        async with Upstream(config.request_timeout, stale, config.instance_headers) as client:
            poller = HealthPoller(registry, client, config.health_interval, config.health_timeout)
            app.state.proxy = Proxy(
                registry,
                policy,
                metrics,
                poller,
                client,
                config.cluster_secret,
                config.max_resumes,
                config.stall_timeout,
            )
            registry.on_leave = policy.forget
            watcher = _membership_watcher(config, registry, metrics, poller)
            if watcher is not None:
                await watcher.start()
            await poller.check_all()
            poller.start()
            try:
                yield
            finally:
                await poller.stop()
                if watcher is not None:
                    await watcher.stop()

    docs: dict[str, Any] = {} if config.api_key is None else API_DOCS_OFF
    app = FastAPI(title="pdserve router", version="0.1.0", lifespan=lifespan, redirect_slashes=False, **docs)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.workload = WorkloadRecorder()
    recommender = Recommender(config.plan_profile, config.plan_slo) if config.plan_profile else None
    _install_error_handlers(app, metrics)
    keyed = [Depends(_auth(config.api_key))]
    app.include_router(_health_router(registry))
    app.include_router(_v1_router(app, config.api_key), dependencies=keyed)
    app.include_router(_tokenizer_router(app, config.api_key), dependencies=keyed)
    app.include_router(
        _metrics_router(app, registry, metrics, recommender),
        dependencies=[] if config.metrics_public else keyed,
    )
    app.include_router(_instances_router(registry), dependencies=keyed)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(TrailingSlash)
    install_drain(app, config.drain_timeout, metrics)  # outermost: SIGTERM drains (router/drain.py)
    return app


def run_router(config: RouterConfig, log_level: str = "info") -> None:
    """Serve the router until SIGTERM/SIGINT has drained it (a second one: at once)."""
    app = build_app(config)
    modes = (
        f"{len(config.instances)} colocated"
        if config.instances
        else (f"{len(config.prefill)} prefill + {len(config.decode)} decode")
    )
    if config.registry is not None:
        modes += " + those registered in " + redact(config.registry)
    logger.info(
        "router at http://%s:%d/v1 in front of %s instances (%s)",
        config.host,
        config.port,
        modes,
        config.policy,
    )
    uv_config = uvicorn_config(app, config.host, config.port, log_level, access_log=False)
    server = DrainingServer(uv_config, app.state.drain)
    tracing.setup(config.otlp_traces_endpoint, "pdserve-router")
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, raised again once uvicorn has drained
        server.run()
    tracing.shutdown()
    if not server.started:  # as uvicorn.run: the port was taken, say
        raise SystemExit(3)

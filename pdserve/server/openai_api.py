"""The OpenAI-compatible HTTP front of one instance: the FastAPI app, its routes, and run_server.

    POST /v1/chat/completions, /v1/completions   text in -> token ids -> the engine (EngineFront) -> text out
    POST /tokenize, /detokenize                  vLLM's: the tokenizer (and chat template) alone
    GET  /v1/models, /health, /metrics           (/pd/info, /debug/kv: pd_routes.py)

An instance given its peers (--prefill on a decode instance, --decode on a prefill one) is an entry of
its cluster itself (entry.py): a client request without kv_transfer_params is served disaggregated.

A completion handler is three steps, each its own module: request_builder.py (validate, tokenize,
SamplingParams -> a Generation, generation.py), streaming.py (run it on the engine: SSE or one answer)
and responses.py (the chat and completion answer shapes). Errors become HTTP answers in errors.py only.

With an API key, every route but /health wants it (/metrics too, unless metrics_public), and the API
docs (/docs, /redoc, /openapi.json) are not served. What every request meets first (body size, a
trailing slash, malformed HTTP, the access log) is pdserve/http_edge's. SIGTERM drains the instance
(server/drain.py: /health and new requests 503, those in flight finish within --drain-timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.config import ServerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.core_client import CoreClient
from pdserve.engine.engine_front import EngineFront
from pdserve.errors import EngineDeadError
from pdserve.http_edge.auth import API_DOCS_OFF, REFUSAL, require_api_key
from pdserve.http_edge.body_limit import BodyLimit
from pdserve.http_edge.draining import DrainGate, DrainingServer
from pdserve.http_edge.slashes import TrailingSlash
from pdserve.http_edge.uvicorn_setup import uvicorn_config
from pdserve.observability import tracing
from pdserve.server import protocol as p
from pdserve.server.drain import COMPLETION_PATHS, instance_drain
from pdserve.server.entry import make_entry
from pdserve.server.errors import AuthenticationError, ErrorKind, install_error_handlers
from pdserve.server.lifespans import combined
from pdserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pdserve.server.pd_routes import pd_router
from pdserve.server.registration import registration_lifespan
from pdserve.server.request_builder import RequestBuilder
from pdserve.server.streaming import GenerationRunner

logger = logging.getLogger(__name__)


class OpenAIServer:
    """One instance's OpenAI front: requests in through `requests`, answers out through `runner`."""

    def __init__(self, engine: EngineFront, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.api_key = config.api_key
        self.requests = RequestBuilder(engine, config, metrics)
        self.entry = make_entry(engine, config)  # with peers, this instance is the cluster's entry
        decode_entry = self.entry.runner if self.entry is not None else None
        self.runner: GenerationRunner = decode_entry or GenerationRunner(engine)
        self.served_model_name = self.requests.served_model_name

    async def relayed(self, raw: Request, path: str) -> Response | None:
        """A prefill entry's answer relayed from a decode peer; None: answer it here."""
        relay = self.entry.relay if self.entry is not None else None
        return None if relay is None else await relay.relayed(raw, path, self.api_key)


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    return require_api_key(api_key, lambda: AuthenticationError(REFUSAL))


def _v1_router(server: OpenAIServer) -> APIRouter:
    router = APIRouter(prefix="/v1")
    requests, runner = server.requests, server.runner

    @router.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        if (answer := await server.relayed(raw, "/v1/chat/completions")) is not None:
            return answer
        gen = await requests.build(raw, p.ChatCompletionRequest, requests.chat_generation)
        return await runner.run(gen, raw)

    @router.post("/completions")
    async def completions(raw: Request) -> Response:
        if (answer := await server.relayed(raw, "/v1/completions")) is not None:
            return answer
        gen = await requests.build(raw, p.CompletionRequest, requests.completion_generation)
        return await runner.run(gen, raw)

    @router.get("/models")
    async def models() -> p.ModelList:
        card = p.ModelCard(
            id=server.served_model_name,
            root=server.engine.model_name,
            max_model_len=server.engine.max_model_len,
        )
        return p.ModelList(data=[card])

    return router


def _tokenizer_router(requests: RequestBuilder) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(raw: Request) -> Response:
        answer = await requests.build(raw, p.TokenizeRequest, requests.tokenize)
        return Response(answer.model_dump_json(), media_type="application/json")

    @router.post("/detokenize")
    async def detokenize(raw: Request) -> Response:
        answer = await requests.build(raw, p.DetokenizeRequest, requests.detokenize)
        return Response(answer.model_dump_json(), media_type="application/json")

    return router


def _health_router(engine: EngineFront) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not engine.is_healthy():
            raise EngineDeadError(f"the engine is not running: {engine.fatal_error or 'stopped'}")
        return JSONResponse({"status": "ok"})

    return router


def _metrics_router(engine: EngineFront, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        if engine.is_healthy():
            metrics.set_engine_stats(await engine.stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router


def build_app(engine: EngineFront, config: ServerConfig) -> FastAPI:
    """The app for one started engine. The engine's lifetime belongs to the caller."""
    metrics = ServerMetrics(block_size=config.engine.cache.block_size)
    server = OpenAIServer(engine, config, metrics)
    metrics.model_name = server.served_model_name
    docs: dict[str, Any] = {} if config.api_key is None else API_DOCS_OFF
    drain = instance_drain(engine, config.drain_timeout, metrics)
    lifespans = [registration_lifespan(engine, config, metrics.registry, drain.on_begin)]
    lifespans.append(server.entry.lifespan if server.entry is not None else None)  # peers polled
    app = FastAPI(
        title="pdserve", version="0.1.0", redirect_slashes=False, lifespan=combined(lifespans), **docs
    )
    app.state.server = server
    app.state.metrics = metrics
    app.state.drain = drain

    def count_error(kind: ErrorKind) -> None:
        metrics.count(kind.outcome)

    install_error_handlers(app, count_error)
    keyed = [Depends(_auth(config.api_key))]
    app.include_router(_health_router(engine))
    app.include_router(_v1_router(server), dependencies=keyed)
    app.include_router(_tokenizer_router(server.requests), dependencies=keyed)
    app.include_router(_metrics_router(engine, metrics), dependencies=[] if config.metrics_public else keyed)
    app.include_router(pd_router(engine, server.served_model_name), dependencies=keyed)
    if server.entry is not None:
        server.entry.install(app, metrics)
        app.include_router(server.entry.routes(), dependencies=keyed)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(TrailingSlash)
    app.add_middleware(DrainGate, drain=drain, paths=COMPLETION_PATHS)
    return app


def run_server(config: ServerConfig) -> None:
    """Start the engine, serve HTTP until SIGTERM/SIGINT has drained it, then stop both (exit status 0).
    If the engine dies, answer the requests in flight (errors), stop, and exit with
    EngineDeadError.EXIT_STATUS so that a supervisor restarts this instance."""
    service = f"pdserve-{config.engine.disagg.role}"
    engine: EngineFront = (
        CoreClient(config.engine, (config.otlp_traces_endpoint, service))
        if config.engine_process
        else AsyncEngine(config.engine)
    )
    tracing.setup(config.otlp_traces_endpoint, service)
    logger.info("loading %s", config.engine.model.path)
    engine.start()
    try:
        app = build_app(engine, config)
        server = _make_uvicorn(app, config)
        engine.on_dead = lambda reason: setattr(server, "should_exit", True)  # uvicorn drains, then stops
        server.should_exit = engine.fatal_error is not None  # died before on_dead was set
        name = config.served_model_name or engine.model_name
        logger.info("serving %s at http://%s:%d/v1", name, config.host, config.port)
        server.run()  # returns once drained (SIGTERM), or at once on a second signal
    finally:
        engine.shutdown()
        tracing.shutdown()
        logger.info("stopped")
    if engine.fatal_error is not None:
        logger.error("exiting: the engine has died (%s)", engine.fatal_error)
        raise SystemExit(EngineDeadError.EXIT_STATUS)


def _make_uvicorn(app: FastAPI, config: ServerConfig) -> DrainingServer:
    uv_config = uvicorn_config(app, config.host, config.port, "info", log_polls=config.access_log_polls)
    return DrainingServer(uv_config, app.state.drain)

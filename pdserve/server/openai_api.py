"""The OpenAI-compatible HTTP front of one instance: the FastAPI app, its routes, and run_server.

    POST /v1/chat/completions, /v1/completions   text in -> token ids -> AsyncEngine -> text out
    GET  /v1/models, /health, /metrics           (/pd/info, /debug/kv: pd_routes.py)

A completion handler is three steps, each its own module: request_builder.py (validate, tokenize,
SamplingParams -> a Generation, generation.py), streaming.py (run it on the engine: SSE or one answer)
and responses.py (the chat and completion answer shapes). Errors become HTTP answers in errors.py only.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.config import ServerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.errors import EngineDeadError
from pdserve.server import protocol as p
from pdserve.server.errors import AuthenticationError, ErrorKind, install_error_handlers
from pdserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pdserve.server.pd_routes import pd_router
from pdserve.server.request_builder import RequestBuilder
from pdserve.server.streaming import GenerationRunner

logger = logging.getLogger(__name__)


class OpenAIServer:
    """One instance's OpenAI front: requests in through `requests`, answers out through `runner`."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.requests = RequestBuilder(engine, config, metrics)
        self.runner = GenerationRunner(engine)
        self.served_model_name = self.requests.served_model_name


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise AuthenticationError("a valid API key is required: Authorization: Bearer <key>")

    return check


def _v1_router(server: OpenAIServer, config: ServerConfig) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(config.api_key))])
    requests, runner = server.requests, server.runner

    @router.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        req = await requests.parse(raw, p.ChatCompletionRequest)
        return await runner.run(requests.chat_generation(req), raw)

    @router.post("/completions")
    async def completions(raw: Request) -> Response:
        req = await requests.parse(raw, p.CompletionRequest)
        return await runner.run(requests.completion_generation(req), raw)

    @router.get("/models")
    async def models() -> p.ModelList:
        card = p.ModelCard(
            id=server.served_model_name,
            root=server.engine.model_name,
            max_model_len=server.engine.max_model_len,
        )
        return p.ModelList(data=[card])

    return router


def _ops_router(engine: AsyncEngine, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not engine.is_healthy():
            raise EngineDeadError(f"the engine is not running: {engine.fatal_error or 'stopped'}")
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        if engine.is_healthy():
            metrics.set_engine_stats(await engine.stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The app for one started AsyncEngine. The engine's lifetime belongs to the caller."""
    metrics = ServerMetrics()
    server = OpenAIServer(engine, config, metrics)
    app = FastAPI(title="pdserve", version="0.1.0")
    app.state.server = server
    app.state.metrics = metrics

    def count_error(kind: ErrorKind) -> None:
        metrics.count(kind.outcome)

    install_error_handlers(app, count_error)
    app.include_router(_v1_router(server, config))
    app.include_router(_ops_router(engine, metrics))
    app.include_router(pd_router(engine))
    return app


def run_server(config: ServerConfig) -> None:
    """Start the engine, serve HTTP until SIGTERM/SIGINT, then stop both cleanly (exit status 0).
    If the engine dies, answer the requests in flight (errors), stop, and exit with
    EngineDeadError.EXIT_STATUS so that a supervisor restarts this instance."""
    engine = AsyncEngine(config.engine)
    logger.info("loading %s", config.engine.model.path)
    engine.start()
    try:
        app = build_app(engine, config)
        server = _make_uvicorn(app, config)
        engine.on_dead = lambda reason: setattr(server, "should_exit", True)  # uvicorn drains, then stops
        server.should_exit = engine.fatal_error is not None  # died before on_dead was set
        name = config.served_model_name or engine.model_name
        logger.info("serving %s at http://%s:%d/v1", name, config.host, config.port)
        server.run()  # returns once a signal asked it to stop and open requests drained
    finally:
        engine.shutdown()
        logger.info("stopped")
    if engine.fatal_error is not None:
        logger.error("exiting: the engine has died (%s)", engine.fatal_error)
        raise SystemExit(EngineDeadError.EXIT_STATUS)


def _make_uvicorn(app: FastAPI, config: ServerConfig) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the stop signal after draining, which would kill us before cleanup."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            stops = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5
    )
    return Server(uv_config)

"""The HTTP edge's pieces without a model: the access-log filter, the router app's keyed routes and
--metrics-public (over a real socket-free ASGI client), and the flags that reach the configs."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from pdserve.cli import build_parser, server_config
from pdserve.http_edge.access_log import PollFilter, quiet_polls
from pdserve.http_edge.limits import DEFAULT_MAX_CHAT_MESSAGES, DEFAULT_MAX_REQUEST_BYTES
from pdserve.router.app import RouterConfig, build_app

NOWHERE = "http://127.0.0.1:9"  # refuses at once: the router starts with its one instance down


def access(method: str, path: str, status: int) -> logging.LogRecord:
    args = ("127.0.0.1:5000", method, path, "1.1", status)
    return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)


def test_poll_filter_drops_only_successful_polls() -> None:
    keep = PollFilter().filter
    assert not keep(access("GET", "/health", 200))
    assert not keep(access("GET", "/pd/info", 200))
    assert not keep(access("GET", "/metrics?x=1", 200))
    assert keep(access("GET", "/health", 503))  # a failing poll is what the log is read for
    assert keep(access("POST", "/v1/completions", 200))
    assert keep(access("GET", "/v1/models", 200))
    logger = logging.getLogger("uvicorn.access")
    try:
        quiet_polls(True)
        quiet_polls(True)
        assert sum(isinstance(f, PollFilter) for f in logger.filters) == 1
    finally:
        quiet_polls(False)
    assert not any(isinstance(f, PollFilter) for f in logger.filters)


def test_router_keys_every_route_but_health_and_public_metrics() -> None:
    for public in (False, True):
        app = build_app(RouterConfig(instances=(NOWHERE,), api_key="k", metrics_public=public))
        with TestClient(app) as client:
            assert client.get("/health").status_code == 503  # open, and honest: no healthy instance
            assert client.get("/router/instances").status_code == 401
            assert client.get("/openapi.json").status_code == 404
            assert client.get("/metrics").status_code == (200 if public else 401)
            auth = {"Authorization": "Bearer k"}
            assert client.get("/router/instances", headers=auth).status_code == 200
            assert client.get("/router/instances/", headers=auth).status_code == 200  # no redirect
            assert app.state.proxy.client.headers["authorization"] == "Bearer k"  # to its instances


def test_router_without_a_key_serves_docs_and_sends_no_authorization() -> None:
    app = build_app(RouterConfig(instances=(NOWHERE,)))
    with TestClient(app) as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/router/instances").status_code == 200
        assert "authorization" not in app.state.proxy.client.headers


def test_limit_flags_reach_the_configs() -> None:
    parse = build_parser().parse_args
    config = server_config(parse(["serve", "--device", "cpu"]))
    assert (config.max_request_bytes, config.max_chat_messages) == (
        DEFAULT_MAX_REQUEST_BYTES,
        DEFAULT_MAX_CHAT_MESSAGES,
    )
    assert (config.metrics_public, config.access_log_polls) == (False, False)
    args = ["serve", "--device", "cpu", "--max-request-bytes", "16MiB", "--max-chat-messages", "8"]
    config = server_config(parse([*args, "--metrics-public", "--access-log-polls"]))
    assert (config.max_request_bytes, config.max_chat_messages) == (16 << 20, 8)
    assert (config.metrics_public, config.access_log_polls) == (True, True)
    router = parse(["router", "--instance", NOWHERE, "--max-request-bytes", "1MiB", "--metrics-public"])
    assert (router.max_request_bytes, router.metrics_public) == (1 << 20, True)

"""The router's drain on SIGTERM, and what it makes of an instance that drains.

the router drains (http_edge/draining.py runs it):
    /health 503 {"status": "draining"}, new completion requests 503 "router_draining", the relays
    open finish within --drain-timeout (then each ends with a "router_draining" error event), exit 0
an instance drains:
    its 503 "instance_draining" to a new request counts as a refused connection (proxy.py `open`):
    the request goes to another instance, and the draining one is out of the rotation until its
    /health passes again (a restarted instance)
"""

from __future__ import annotations

from fastapi import FastAPI

from pdserve.http_edge.draining import Drain, DrainGate
from pdserve.router.errors import RouterError
from pdserve.router.metrics import RouterMetrics

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_DRAIN_TIMEOUT_S = 30.0


def install_drain(app: FastAPI, timeout: float, metrics: RouterMetrics) -> Drain:
    """The router's drain: its gate on `app` (outermost), its state in app.state.drain."""
    message = "the router is draining (shutting down): send the request elsewhere"
    error = RouterError(503, message, "router_draining", "service_unavailable_error")
    drain = Drain(timeout, error.body(), name="router")
    drain.on_refused = lambda: metrics.count_error(error.code)
    app.add_middleware(DrainGate, drain=drain, paths=COMPLETION_PATHS)
    app.state.drain = drain
    return drain

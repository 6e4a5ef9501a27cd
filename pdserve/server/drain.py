"""An instance's drain on SIGTERM (http_edge/draining.py runs it; this module says what it means here).

    /health                         503 {"status": "draining"}
    new chat/completions requests   503 "instance_draining" (a router sends them to another instance)
    the registry entry              removed at once (registration.py adds that step)
    a prefill instance              refuses new Reserves (Failed "draining": the decode side answers
                                    prefill_failed, and the router tries another prefill), finishes
                                    the transfers it has started
    after --drain-timeout           streams end with an "instance_draining" error event, answers not
                                    begun are 503 "instance_draining"; then the engine stops, exit 0

Metrics: pdserve_drain_seconds (how long the drain has taken, its final value once drained) and
pdserve_drain_aborted_requests_total (requests the drain ended at its timeout).
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Gauge

from pdserve.engine.engine_front import EngineFront
from pdserve.http_edge.draining import Drain
from pdserve.server.errors import InstanceDrainingError, error_body, kind_of
from pdserve.server.metrics import ServerMetrics

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
DRAINING = "draining"  # the Failed reason a draining prefill instance gives a Reserve
_SETTLE_POLL_S = 0.1


def instance_drain(engine: EngineFront, timeout: float, metrics: ServerMetrics) -> Drain:
    """The drain of one instance, its metrics registered in `metrics`."""
    error = InstanceDrainingError("this instance is draining (shutting down): send the request elsewhere")
    drain = Drain(timeout, error_body(str(error), kind_of(error)), name="instance")
    seconds = Gauge(
        "pdserve_drain_seconds",
        "How long this instance's drain has taken (0: not draining; its final value once drained)",
        registry=metrics.registry,
    )
    seconds.set_function(drain.elapsed)
    aborted = Counter(
        "pdserve_drain_aborted_requests",
        "Requests the drain ended at --drain-timeout",
        registry=metrics.registry,
    )
    drain.on_refused = lambda: metrics.count("instance_draining")
    drain.on_done = lambda _, cut: aborted.inc(cut)
    if engine.role == "prefill":
        drain.on_begin.append(lambda: engine.refuse_reserves(DRAINING))
    drain.settle.append(lambda deadline: _engine_idle(engine, deadline))
    return drain


async def _engine_idle(engine: EngineFront, deadline: float) -> None:
    """Until nothing runs in the engine (a prefill's Reserves computed and their KV sent) or `deadline`."""
    while engine.is_healthy() and time.monotonic() < deadline:
        load = engine.load
        if not load.get("num_running") and not load.get("num_waiting") and await engine.check_pool_free():
            return
        await asyncio.sleep(_SETTLE_POLL_S)

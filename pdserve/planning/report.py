"""A simulated run as `pdserve bench serve` writes a measured one (bench/metrics.py's shape), so that
the same tables and `pdserve bench plot` read both. Every number is on the simulated clock; the
header says so (`"simulated": true`, the profile, the layout)."""

from __future__ import annotations

import datetime
import math
from typing import Any

from pdserve.bench.client import RequestResult
from pdserve.bench.metrics import SLO, per_request, summarize
from pdserve.planning.layout import Layout
from pdserve.planning.profile import Profile
from pdserve.planning.simulator import SimRun, Trace


def request_result(trace: Trace) -> RequestResult:
    spec, times = trace.spec, trace.token_times
    result = RequestResult(spec.input_len, spec.output_len, start=spec.arrival)
    if trace.error or trace.finished is None or not times:
        result.error = trace.error or "never finished"
        return result
    result.success = True
    shown = times[min(trace.first_visible, len(times) - 1) :]  # what the client's stream shows
    result.ttft = shown[0] - spec.arrival
    result.itl = [b - a for a, b in zip(shown, shown[1:], strict=False)]
    result.latency = trace.finished - spec.arrival
    result.output_len = len(times)
    return result


def sim_result(
    run: SimRun, slo: SLO, layout: Layout, profiles: dict[int, Profile], rate: float, label: str | None = None
) -> dict[str, Any]:
    """The bench-serve-shaped JSON of one simulated run."""
    results = [request_result(t) for t in run.traces]
    first = min((t.spec.arrival for t in run.traces), default=0.0)
    duration = max(run.end - first, 1e-9)
    out: dict[str, Any] = {
        "label": label or f"simulated {layout}",
        "simulated": True,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "layout": str(layout),
        "gpus": layout.gpus,
        "profiles": {str(tp): p.meta.get("source", p.model) for tp, p in profiles.items()},
        "model_id": next(iter(profiles.values())).model,
        "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(rate) else rate,
        "slo": slo.as_dict(),
        "utilization": {i.name: i.busy_seconds / duration for i in run.instances},
    }
    out.update(summarize(results, duration, slo))
    out.update(per_request(results, first))
    return out

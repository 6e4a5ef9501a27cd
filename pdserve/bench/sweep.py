"""A request-rate sweep: runs from a low rate up to saturation; the highest goodput at the SLO.

Rates run in increasing order. After each one (from the second on) the sweep stops when SLO attainment
fell below `min_attainment`: past that point the server is saturated and higher rates only add queueing.
The answer is the rate whose run had the highest request_goodput. How one rate is run is the caller's
(`run_at(rate, index)` returns that run's result dict, as `bench serve` writes it), so this module
knows nothing about HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

MIN_RATES = 2
RunAt = Callable[[float, int], dict[str, Any]]


def parse_rates(text: str) -> list[float]:
    """'0.5,1,2,inf' -> [0.5, 1.0, 2.0, inf], sorted, each positive."""
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"not a list of rates: {text!r} (try 0.5,1,2,4)") from None
    if not rates or rates[0] <= 0:
        raise ValueError(f"rates must be positive numbers: {text!r}")
    return rates


def geometric_rates(start: float, factor: float, count: int) -> list[float]:
    """start, start*factor, start*factor^2, ... (`count` rates)."""
    if start <= 0 or factor <= 1 or count < 1:
        raise ValueError("need --rate-start > 0, --rate-factor > 1 and --max-rates >= 1")
    return [start * factor**i for i in range(count)]


def prompts_for_rate(rate: float, num_prompts: int, arrival_seconds: float | None) -> int:
    """Requests for one rate: `num_prompts`, or more so that arrivals last `arrival_seconds` at least.
    A run of N requests at rate r lasts N/r plus the last answers' latency, so with a fixed N the
    throughput measured at high rates is bounded by the run's length, not by the server."""
    if arrival_seconds is None or math.isinf(rate):
        return num_prompts
    return max(num_prompts, math.ceil(rate * arrival_seconds))


def run_sweep(run_at: RunAt, rates: Sequence[float], min_attainment: float) -> dict[str, Any]:
    """Run each rate in increasing order until attainment drops below `min_attainment`."""
    results: list[dict[str, Any]] = []
    stopped = "every rate ran"
    for index, rate in enumerate(sorted(rates)):
        result = run_at(rate, index)
        results.append(result)
        attainment = float(result["slo_attainment"])
        if index + 1 >= MIN_RATES and attainment < min_attainment:
            stopped = f"SLO attainment {attainment:.2f} < {min_attainment:g} at {rate:g} req/s"
            break
    return {"results": results, "stopped": stopped, "best": best_point(results)}


def best_point(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the highest request_goodput (the lower rate on a tie)."""
    if not results:
        return None
    best = max(results, key=lambda r: (r["request_goodput"], -rate_of(r)))
    keys = ("request_rate", "request_goodput", "slo_attainment", "request_throughput", "output_throughput")
    return {k: best[k] for k in keys}


def rate_of(result: dict[str, Any]) -> float:
    """A result's request rate as a number ("inf" in the JSON is math.inf)."""
    return float(result["request_rate"])


def format_sweep(sweep: dict[str, Any]) -> str:
    """One line per rate, then the best goodput and why the sweep stopped."""
    names = ("rate", "req/s", "goodput", "attain", "out tok/s", "p99 TTFT", "p99 TPOT")
    lines = [" ".join(f"{n:>{w}}" for n, w in zip(names, (8, 8, 8, 7, 10, 9, 9), strict=True))]
    for r in sweep["results"]:
        rate = rate_of(r)
        shown = "inf" if math.isinf(rate) else f"{rate:g}"
        lines.append(
            f"{shown:>8} {r['request_throughput']:>8.2f} {r['request_goodput']:>8.2f} "
            f"{r['slo_attainment']:>7.2f} {r['output_throughput']:>10.1f} "
            f"{_ms(r['p99_ttft_ms']):>9} {_ms(r['p99_tpot_ms']):>9}"
        )
    best = sweep["best"]
    if best is not None:
        lines.append(f"best goodput: {best['request_goodput']:.2f} req/s at {best['request_rate']} req/s")
    lines.append(f"stopped: {sweep['stopped']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"

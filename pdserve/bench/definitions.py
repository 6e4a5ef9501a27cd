"""The per-token metrics of guidellm and aiperf, named beside ours and computed from our measurements.

The three tools time the same stream but cut it differently. One streamed request, as each sees it:

    send ── TTFT ──▶ chunk 1 ── gap ──▶ chunk 2 ... chunk k ──▶ usage, [DONE]
    |<──────────── E2EL: ours, guidellm's request_latency ─────────────────▶|
    |<──────────── aiperf's request_latency ──────────▶|   (ends at the last text chunk)

- "TPOT" means two things: ours (vLLM's) is (E2EL - TTFT) / (tokens - 1), the first token excluded;
  guidellm's time_per_output_token_ms is (last chunk - send) / tokens, the first token and TTFT
  included, so it is larger whenever TTFT exceeds a decode step.
- "ITL" means two things: ours (vLLM's) is every gap between two text chunks, pooled over requests
  (aiperf calls that inter_chunk_latency); guidellm's and aiperf's inter_token_latency is a per-request
  average, (last chunk - first chunk) / (tokens - 1), i.e. our TPOT without the tail after the last chunk.
  guidellm weights each request by tokens - 1 when averaging; aiperf averages requests equally.
- Output tokens/s: overall, every tool divides all output tokens by the run's wall time (guidellm's
  output_tokens_per_second mean, aiperf's output_token_throughput, our output_throughput); per request,
  guidellm divides a request's tokens by its latency and aiperf reports 1 / its ITL (tokens/s/user).
- Token counts: ours and guidellm's come from the server's usage; aiperf re-tokenizes the text unless
  given --use-server-token-count.

`EQUIVALENTS` lists, for each of their metrics, the matching one of ours (if any) and how to compute
theirs from a RequestResult; `equivalents()` does that, so a `pdserve bench` report shows their numbers.
This module knows nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.bench.client import RequestResult

PerRequest = Callable[["RequestResult"], "float | None"]
Weight = Callable[["RequestResult"], float]


@dataclass(frozen=True)
class Equivalent:
    """One metric of another tool: its name there, its formula, the nearest of ours, how to get it."""

    tool: str  # "guidellm" or "aiperf"
    name: str  # its key in that tool's JSON
    formula: str
    ours: str  # the nearest key in our report ("" when we have none), and how it differs
    value: PerRequest  # per request, in the unit of `name`; None when the request has none
    weight: Weight | None = None  # the tool's averaging weight per request (None: equal)


def _last_chunk(r: RequestResult) -> float | None:
    """Seconds from send to the last text chunk (the clocks of `r.itl` start at the first one)."""
    return None if r.ttft is None else r.ttft + sum(r.itl)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def _decode_per_token(r: RequestResult) -> float | None:
    """(last chunk - first chunk) / (tokens - 1): guidellm's and aiperf's inter_token_latency."""
    if r.ttft is None or r.output_len < 2:
        return None
    return sum(r.itl) / (r.output_len - 1)


def _per_token_incl_first(r: RequestResult) -> float | None:
    last = _last_chunk(r)
    return None if last is None or r.output_len < 1 else last / r.output_len


def _per_second(seconds: float | None, tokens: int) -> float | None:
    return None if seconds is None or seconds <= 0 else tokens / seconds


def _ttft_ms(r: RequestResult) -> float | None:
    return _ms(r.ttft)


def _decode_ms(r: RequestResult) -> float | None:
    return _ms(_decode_per_token(r))


def _tokens_less_one(r: RequestResult) -> float:
    return float(max(r.output_len - 1, 0))


def _user_rate(r: RequestResult) -> float | None:
    decode = _decode_per_token(r)
    return None if not decode else 1.0 / decode


EQUIVALENTS = (
    Equivalent("guidellm", "time_to_first_token_ms", "first chunk - send", "ttft (same)", _ttft_ms),
    Equivalent(
        "guidellm",
        "inter_token_latency_ms",
        "(last chunk - first chunk) / (tokens - 1), weighted by tokens - 1",
        "tpot (ours runs to [DONE], not to the last chunk)",
        _decode_ms,
        _tokens_less_one,
    ),
    Equivalent(
        "guidellm",
        "time_per_output_token_ms",
        "(last chunk - send) / tokens, weighted by tokens: TTFT and the first token included",
        "none (our tpot excludes the first token)",
        lambda r: _ms(_per_token_incl_first(r)),
        lambda r: float(r.output_len),
    ),
    Equivalent("guidellm", "request_latency", "[DONE] - send, seconds", "e2el (same)", lambda r: r.latency),
    Equivalent(
        "guidellm",
        "output_tokens_per_second (per request)",
        "tokens / request_latency",
        "none (our output_throughput is the run's)",
        lambda r: _per_second(r.latency, r.output_len),
    ),
    Equivalent("aiperf", "time_to_first_token", "first chunk - send", "ttft (same)", _ttft_ms),
    Equivalent(
        "aiperf",
        "inter_token_latency",
        "(request_latency - TTFT) / (tokens - 1), requests equal",
        "tpot (ours runs to [DONE], not to the last chunk)",
        _decode_ms,
    ),
    Equivalent(
        "aiperf",
        "inter_chunk_latency",
        "every gap between two text chunks, pooled",
        "itl (same)",
        lambda r: None,  # a list per request: computed from `itl` in equivalents()
    ),
    Equivalent(
        "aiperf",
        "request_latency",
        "last text chunk - send (the usage chunk and [DONE] excluded)",
        "e2el (ours runs to [DONE])",
        lambda r: _ms(_last_chunk(r)),
    ),
    Equivalent(
        "aiperf",
        "output_token_throughput_per_user",
        "1 / inter_token_latency, tokens/s",
        "1 / tpot",
        _user_rate,
    ),
)


def _mean(values: Sequence[float], weights: Sequence[float] | None) -> float | None:
    if not values:
        return None
    if weights is None:
        return sum(values) / len(values)
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total > 0 else None


def equivalent_mean(eq: Equivalent, done: Sequence[RequestResult]) -> float | None:
    """The tool's mean of `eq` over completed requests, averaged the way that tool averages."""
    if eq.name == "inter_chunk_latency":
        gaps = [gap * 1000.0 for r in done for gap in r.itl]
        return _mean(gaps, None)
    pairs = [(v, eq.weight(r) if eq.weight else 1.0) for r in done if (v := eq.value(r)) is not None]
    return _mean([v for v, _ in pairs], [w for _, w in pairs] if eq.weight else None)


def equivalents(done: Sequence[RequestResult], output_throughput: float) -> dict[str, dict[str, Any]]:
    """{tool: {metric: mean}} for guidellm and aiperf, from our completed requests; both tools' overall
    output tokens/s is ours (all output tokens over the run's wall time)."""
    out: dict[str, dict[str, Any]] = {"guidellm": {}, "aiperf": {}}
    for eq in EQUIVALENTS:
        out[eq.tool][eq.name] = equivalent_mean(eq, done)
    out["guidellm"]["output_tokens_per_second"] = output_throughput
    out["aiperf"]["output_token_throughput"] = output_throughput
    return out


def definitions() -> list[dict[str, str]]:
    """The table stored in every report: each of their metrics, its formula, our nearest one."""
    rows = [{"tool": e.tool, "metric": e.name, "formula": e.formula, "ours": e.ours} for e in EQUIVALENTS]
    overall = "all output tokens / wall time of the run"
    rows.append({"tool": "guidellm", "metric": "output_tokens_per_second", "formula": overall, "ours": ""})
    rows.append({"tool": "aiperf", "metric": "output_token_throughput", "formula": overall, "ours": ""})
    for row in rows[-2:]:
        row["ours"] = "output_throughput (same)"
    return rows


def format_equivalents(eq: dict[str, dict[str, Any]], width: int = 52) -> str:
    """The printed block: each tool's metric names with the value computed from this run."""
    rows = [f"{' The same run in their terms (means) ':-^{width}}"]
    for tool, metrics in eq.items():
        rows.append(f"{tool}:")
        for name, value in metrics.items():
            shown = "-" if value is None else f"{value:.2f}"
            rows.append(f"  {name:<{width - 14}}{shown:>12}")
    return "\n".join(rows)

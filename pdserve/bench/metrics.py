"""The summary of one run, from its RequestResults: throughput, latency distributions, goodput, and its table.

Field names follow vLLM's `bench serve` JSON where one exists, so the numbers compare side by side:
request_throughput, output_throughput, total_token_throughput, request_goodput, and for each of
ttft, tpot, itl, e2el: mean_X_ms, median_X_ms, std_X_ms, p90_X_ms, p99_X_ms (None when no request had
one). Definitions:

- throughputs count completed requests only, over the whole run's wall time (`duration`);
- a request cut at a duration limit (runner.py) is neither completed nor failed: it is counted in
  `cut` and left out of every distribution and of SLO attainment;
- TPOT is per request, (E2EL - TTFT) / (output tokens - 1); a 1-token answer has none;
- ITL is every gap between two streamed text chunks, over all requests;
- a request is *good* when it completed and meets every SLO given (a 1-token answer meets any TPOT
  SLO); with no SLO, every completed request is good. request_goodput = good / duration,
  slo_attainment = good / all requests sent (failures count against it).

Per-request lists (ttfts, tpots, itls, e2els in seconds, as vLLM stores them; start_times: seconds from
the run's start to when each was sent) keep the order requests were made in; a failed request has None
(and no ITLs) there and its text in `errors`.

How guidellm and aiperf name and define the same numbers: definitions.py (its values are in the report
under `equivalents`, its table under `definitions`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pdserve.bench.definitions import equivalents, format_equivalents

if TYPE_CHECKING:
    from pdserve.bench.client import RequestResult

PERCENTILES = (90, 99)
METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)"}
METRICS.update({"itl": "Inter-token Latency", "e2el": "End-to-end Latency"})


@dataclass(frozen=True)
class SLO:
    """Per-request limits in milliseconds; None: no limit on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.success or r.ttft is None:
            return False
        limits = ((self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot or 0.0), (self.e2el_ms, r.latency))
        return all(limit is None or value * 1000.0 <= limit for limit, value in limits)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_slo(text: str) -> SLO:
    """'ttft=500,tpot=50' (milliseconds; e2el too; ':' works as well as '=') -> SLO."""
    limits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(ttft|tpot|e2el)\s*[=:]\s*([0-9]*\.?[0-9]+)", part)
        if m is None:
            raise ValueError(f"not an SLO: {part!r} (try ttft=500,tpot=50, in milliseconds)")
        limits[f"{m.group(1)}_ms"] = float(m.group(2))
    return SLO(**limits)


def distribution(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99 of `seconds`, in milliseconds, under vLLM's key names."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"p{p}_{name}_ms" for p in PERCENTILES]
    if not seconds:
        return dict.fromkeys(keys, None)
    import numpy as np  # here, so that `pdserve --help` and `pdserve router` never pay for it

    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    values = [np.mean(ms), np.median(ms), np.std(ms), *np.percentile(ms, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, values, strict=True)}


def summarize(results: Sequence[RequestResult], duration: float, slo: SLO) -> dict[str, Any]:
    """The aggregate numbers of one run (see the module docstring for definitions)."""
    done = [r for r in results if r.success]
    decided = [r for r in results if not r.cut]
    seconds = max(duration, 1e-9)
    total_in = sum(r.input_len for r in done)
    total_out = sum(r.output_len for r in done)
    good = sum(1 for r in decided if slo.met_by(r))
    reported = [r.cached_input_len for r in done if r.cached_input_len is not None]
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(decided) - len(done),
        "cut": len(results) - len(decided),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / seconds,
        "request_goodput": good / seconds,
        "slo_attainment": good / len(decided) if decided else 0.0,
        "input_throughput": total_in / seconds,
        "output_throughput": total_out / seconds,
        "total_token_throughput": (total_in + total_out) / seconds,
        "total_cached_input_tokens": sum(reported) if reported else None,  # None: the server never said
    }
    summary.update(distribution("ttft", [r.ttft for r in done if r.ttft is not None]))
    summary.update(distribution("tpot", [t for t in (r.tpot for r in done) if t is not None]))
    summary.update(distribution("itl", [gap for r in done for gap in r.itl]))
    summary.update(distribution("e2el", [r.latency for r in done]))
    summary["equivalents"] = equivalents(done, summary["output_throughput"])
    return summary


def per_request(results: Sequence[RequestResult], run_start: float = 0.0) -> dict[str, list[Any]]:
    """The per-request lists stored with a run, in the order the requests were made."""
    return {
        "start_times": [r.start - run_start for r in results],
        "input_lens": [r.input_len for r in results],
        "output_lens": [r.output_len if r.success else 0 for r in results],
        "usage_input_lens": [r.usage_input_len for r in results],
        "cached_input_lens": [r.cached_input_len for r in results],
        "ttfts": [r.ttft if r.success else None for r in results],
        "tpots": [r.tpot for r in results],
        "itls": [r.itl if r.success else [] for r in results],
        "e2els": [r.latency if r.success else None for r in results],
        "errors": [r.error for r in results],
    }


COUNT_ROWS = (
    ("Successful requests:", "completed"),
    ("Failed requests:", "failed"),
    ("Cut at the duration limit:", "cut"),
    ("Benchmark duration (s):", "duration"),
    ("Total input tokens:", "total_input_tokens"),
    ("Total generated tokens:", "total_output_tokens"),
    ("Request throughput (req/s):", "request_throughput"),
    ("Request goodput (req/s):", "request_goodput"),
    ("SLO attainment:", "slo_attainment"),
    ("Output token throughput (tok/s):", "output_throughput"),
    ("Total token throughput (tok/s):", "total_token_throughput"),
)
STAT_LABELS = {"mean": "Mean", "median": "Median", **{f"p{p}": f"P{p}" for p in PERCENTILES}}


def format_table(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The printed summary: counts, throughputs, then each latency metric's mean/median/p90/p99."""
    width = 52
    rows = [f"{' ' + title + ' ':=^{width}}"]
    rows += [_row(label, summary[key]) for label, key in COUNT_ROWS]
    for name, heading in METRICS.items():
        rows.append(f"{' ' + heading + ' ':-^{width}}")
        for stat, shown in STAT_LABELS.items():
            rows.append(_row(f"{shown} {name.upper()} (ms):", summary[f"{stat}_{name}_ms"]))
    if "equivalents" in summary:
        rows.append(format_equivalents(summary["equivalents"], width))
    rows.append("=" * width)
    return "\n".join(rows)


def error_summary(errors: Sequence[str], most: int = 3) -> str:
    """The most frequent error texts among a run's `errors` list, with counts ("" when none failed)."""
    counts = Counter(e for e in errors if e)
    return "\n".join(f"{n} x {text}" for text, n in counts.most_common(most))


def _row(label: str, value: Any) -> str:
    if value is None:
        shown = "-"
    elif isinstance(value, float):
        shown = f"{value:.2f}"
    else:
        shown = str(value)
    return f"{label:<40}{shown:>12}"

"""PNG charts that compare benchmark runs (matplotlib, Agg backend: no display needed).

Input: result files of `bench serve` (one run) and `bench sweep` (one run per rate). Output, in one
directory:

    ttft_cdf.png, tpot_cdf.png       one curve per run (each rate of a sweep is a run)
    throughput_vs_rate.png           only when some runs form a sweep: a sweep file, or several
    goodput_vs_rate.png              `serve` results of one label at different finite request rates;
    attainment_vs_rate.png           one line per sweep
    latency_vs_rate.png              p99 TTFT and p99 TPOT

This module reads result JSON and draws; it never runs a benchmark.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Run:
    name: str
    result: Result


def load(paths: Sequence[str | Path]) -> tuple[list[Run], dict[str, list[Result]]]:
    """Every run in the files, and the sweeps among them (label -> results sorted by rate)."""
    runs: list[Run] = []
    series: dict[str, list[Result]] = {}
    singles: dict[str, list[Result]] = defaultdict(list)
    for path in map(Path, paths):
        data = json.loads(path.read_text())
        label = str(data.get("label") or path.stem)
        if "results" in data:
            series[label] = data["results"]
            runs += [Run(f"{label} @ {_rate_text(r)}", r) for r in data["results"]]
        else:
            singles[label].append(data)
            runs.append(Run(label, data))
    for label, results in singles.items():
        if len({_rate(r) for r in results if math.isfinite(_rate(r))}) >= 2:
            series.setdefault(label, results)
    finite = {k: sorted((r for r in v if math.isfinite(_rate(r))), key=_rate) for k, v in series.items()}
    return runs, {k: v for k, v in finite.items() if v}


def make_plots(paths: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw every chart the inputs allow into `out_dir`; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, series = load(paths)
    written = [
        cdf_chart(runs, "ttfts", "TTFT", out / "ttft_cdf.png"),
        cdf_chart(runs, "tpots", "TPOT", out / "tpot_cdf.png"),
    ]
    if series:
        for name, panels in RATE_PANELS.items():
            written.append(rate_chart(series, panels, out / f"{name}_vs_rate.png"))
    return written


def cdf_chart(runs: Sequence[Run], key: str, metric: str, path: Path) -> Path:
    """The empirical CDF of one per-request metric (seconds in the JSON, drawn in ms), a curve per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ms = sorted(v * 1000.0 for v in run.result.get(key) or () if v is not None)
        if ms:
            ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", label=run.name)
    ax.set(xlabel=f"{metric} (ms)", ylabel="fraction of requests", title=f"{metric} CDF", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(fig, path)


# one panel of a rate chart: (title, y label, the result key drawn)
Panel = tuple[str, str, str]
RATE_PANELS: dict[str, list[Panel]] = {
    "throughput": [
        ("Request throughput", "completed req/s", "request_throughput"),
        ("Output token throughput", "tok/s", "output_throughput"),
    ],
    "goodput": [("Goodput at the SLO", "good req/s", "request_goodput")],
    "attainment": [("SLO attainment", "fraction of requests", "slo_attainment")],
    "latency": [("p99 TTFT", "ms", "p99_ttft_ms"), ("p99 TPOT", "ms", "p99_tpot_ms")],
}


def rate_chart(series: dict[str, list[Result]], panels: list[Panel], path: Path) -> Path:
    """Panels of metrics against the offered request rate, one line per sweep."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    rates = [_rate(r) for results in series.values() for r in results]
    for ax, (title, ylabel, key) in zip(axes[0], panels, strict=True):
        for label, results in series.items():
            points = [(_rate(r), r[key]) for r in results if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xlabel="request rate (req/s)", ylabel=ylabel, title=title)
        if max(rates) >= 8 * min(rates):  # a geometric sweep reads best on a log axis
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rate(result: Result) -> float:
    return float(result.get("request_rate", math.inf))


def _rate_text(result: Result) -> str:
    rate = _rate(result)
    return "inf" if math.isinf(rate) else f"{rate:g} req/s"

"""Markdown tables for docs/benchmarks.md from `pdserve bench sweep` result files.

    python benchmarks/pd_report.py results/qwen2.5-32b-colocated2.json results/qwen2.5-32b-1p1d.json \\
        --slo loose=ttft=2000,tpot=100 --slo tight=ttft=2000,tpot=25

One row per (layout, request rate): QPS, output and total TPS, TTFT and TPOT p50/p99, and goodput under
each SLO, recomputed from the per-request latencies in the files (so SLOs can be added after the run).
Then, per SLO, the highest goodput of each layout and the gain of every layout over the first one, and
the throughput gain at the highest rate each sustained (the seed's "+QPS, +TPS" comparison).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse_slo(text: str) -> tuple[str, dict[str, float]]:
    name, _, spec = text.partition("=")
    limits = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        limits[key.strip()] = float(value) / 1000.0  # ms -> s
    return name, limits


def goodput(run: dict[str, Any], limits: dict[str, float]) -> float:
    """Requests/s that met every limit (failed requests never do)."""
    ok = 0
    for i, err in enumerate(run["errors"]):
        if err:
            continue
        values = {"ttft": run["ttfts"][i], "tpot": run["tpots"][i], "e2el": run["e2els"][i]}
        if all(values[k] is None and k == "tpot" or (values[k] or 0.0) <= lim for k, lim in limits.items()):
            ok += 1
    return ok / max(run["duration"], 1e-9)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def rows(label: str, sweep: dict[str, Any], slos: list[tuple[str, dict[str, float]]]) -> list[str]:
    out = []
    for r in sweep["results"]:
        cells = [label, fmt(float(r["request_rate"]), 2), fmt(r["request_throughput"], 2)]
        cells += [fmt(r["output_throughput"], 0), fmt(r["total_token_throughput"], 0)]
        cells += [fmt(r["median_ttft_ms"], 0), fmt(r["p99_ttft_ms"], 0)]
        cells += [fmt(r["median_tpot_ms"], 1), fmt(r["p99_tpot_ms"], 1)]
        cells += [fmt(goodput(r, lim), 2) for _, lim in slos]
        out.append("| " + " | ".join(cells) + " |")
    return out


def summary(named: list[tuple[str, dict[str, Any]]], slos: list[tuple[str, dict[str, float]]]) -> list[str]:
    lines = ["", "| layout | " + " | ".join(f"best goodput, {n} SLO (req/s)" for n, _ in slos)]
    lines[-1] += " | max QPS | max output TPS |"
    lines.append("|---" * (len(slos) + 3) + "|")
    base: list[float] = []
    for i, (label, sweep) in enumerate(named):
        best = [max(goodput(r, lim) for r in sweep["results"]) for _, lim in slos]
        qps = max(r["request_throughput"] for r in sweep["results"])
        tps = max(r["output_throughput"] for r in sweep["results"])
        values = [*best, qps, tps]
        if i == 0:
            base = values
        cells = [
            f"{v:.2f}" + ("" if i == 0 or not b else f" ({(v / b - 1) * 100:+.1f}%)")
            for v, b in zip(values, base, strict=True)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--slo", action="append", default=None, help="name=ttft=MS,tpot=MS (repeatable)")
    args = ap.parse_args()
    slos = [parse_slo(s) for s in (args.slo or ["loose=ttft=2000,tpot=100", "tight=ttft=2000,tpot=25"])]
    named = []
    for path in args.results:
        sweep = json.loads(Path(path).read_text())
        named.append((str(sweep["results"][0].get("label") or Path(path).stem), sweep))
    head = ["layout", "rate", "QPS", "out TPS", "total TPS", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"]
    head += [f"goodput {n}" for n, _ in slos]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for label, sweep in named:
        print("\n".join(rows(label, sweep, slos)))
    print("\n".join(summary(named, slos)))


if __name__ == "__main__":
    main()

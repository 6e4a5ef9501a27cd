"""The seeds' xPyD tables by simulation: BladeLLM's 2P1D vs 3 colocated and 3P2D vs 5 colocated
(Qwen2.5-72B, 1100:140), and its P:D advice per per-user speed target, recomputed from a measured
`pdserve profile` (pdserve/planning). Everything printed here is simulated, not measured.

    python benchmarks/seed_tables.py --profile docs/bench/h100/profile-7b.json --out results/seed.json

For each pair of layouts on the same GPUs:
- goodput (req/s with 90% of requests within TTFT <= --ttft-ms and TPOT <= 50 ms, then 25 ms),
  found by pdserve.planning.planner.capacity (doubling, then bisection);
- QPS and output TPS at saturation: every request sent at once, requests and output tokens a second
  over the run (the GPUs, not latency targets, bound them).
A goodput search stops after 24 doublings: a layout whose SLOs hold for every rate (a small model on a
fast GPU) shows a meaningless huge figure there; such a profile does not fit the seeds' 72B table.
The ratio advice: for a per-user speed target S tokens/s (TPOT <= 1000/S ms), one prefill and one
decode instance's capacities apart (planner.recommend_counts at a rate that needs several of each);
P:D = the counts that rate needs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import SLO
from pdserve.planning.layout import parse_layout
from pdserve.planning.planner import capacity, recommend_counts, simulate
from pdserve.planning.profile import Profile
from pdserve.planning.workload import Workload

PAIRS = (("colocated:3", "pd:2:1"), ("colocated:5", "pd:3:2"))
SEED = {"pd:2:1": {"qps": 25.5, "tps": 7.1}, "pd:3:2": {"qps": 20.7, "tps": 14.3}}
SEED_ADVICE = {20.0: "1:2.3", 15.0: "1.4:1"}
LOOSE = SLO(ttft_ms=10_000, tpot_ms=200)


def layout_figures(layout: str, profile: Profile, workload: Workload, ttft_ms: float) -> dict[str, Any]:
    lay, profiles = parse_layout(layout), {profile.tp: profile}
    out: dict[str, Any] = {"layout": layout, "gpus": lay.gpus}
    burst = simulate(lay, profiles, workload.at_rate(float("inf")), LOOSE)  # every request at once
    out["qps"], out["tps"] = burst["request_throughput"], burst["output_throughput"]
    for tpot in (50, 25):
        out[f"goodput_tpot{tpot}"] = capacity(lay, profiles, workload, SLO(ttft_ms=ttft_ms, tpot_ms=tpot))
    return out


def compare(pair: tuple[str, str], profile: Profile, workload: Workload, ttft_ms: float) -> dict[str, Any]:
    base, pd = (layout_figures(layout, profile, workload, ttft_ms) for layout in pair)
    gains = {
        k: (pd[k] / base[k] - 1) * 100 if base[k] > 0 else None
        for k in ("qps", "tps", "goodput_tpot50", "goodput_tpot25")
    }
    return {"colocated": base, "pd": pd, "gain_pct": gains, "seed_gain_pct": SEED[pair[1]]}


def ratio_advice(profile: Profile, workload: Workload, speed: float, ttft_ms: float) -> dict[str, Any]:
    slo = SLO(ttft_ms=ttft_ms, tpot_ms=1000.0 / speed)
    lay = parse_layout("colocated:1")
    one = capacity(lay, {profile.tp: profile}, workload, slo)
    rate = max(one, 0.1) * 8  # a rate that needs several instances, so the ratio is not rounding
    counts = recommend_counts(profile, workload.at_rate(rate), slo)
    ratio = None if counts is None else counts["prefill"] / counts["decode"]
    return {
        "tokens_per_s_per_user": speed,
        "rate": rate,
        "counts": counts,
        "p_to_d": ratio,
        "seed_advice": SEED_ADVICE.get(speed),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| layouts (same GPUs) | QPS | TPS | goodput TPOT<=50ms | goodput TPOT<=25ms | seed QPS / TPS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in result["pairs"]:
        g, base, pd, seed = c["gain_pct"], c["colocated"], c["pd"], c["seed_gain_pct"]

        def cell(k: str, g: dict[str, Any] = g, base: dict[str, Any] = base, pd: dict[str, Any] = pd) -> str:
            pct = "n/a" if g[k] is None else f"{g[k]:+.1f}%"
            return f"{pd[k]:.2f} vs {base[k]:.2f} ({pct})"

        name = f"{pd['layout']} vs {base['layout']}"
        cells = " | ".join(cell(k) for k in ("qps", "tps", "goodput_tpot50", "goodput_tpot25"))
        lines.append(f"| {name} | {cells} | +{seed['qps']}% / +{seed['tps']}% |")
    lines += ["", "| per-user speed | P:D (simulated) | seed's advice |", "|---:|---:|---:|"]
    for a in result["advice"]:
        ratio = "n/a" if a["p_to_d"] is None else f"{a['counts']['prefill']}:{a['counts']['decode']}"
        lines.append(f"| {a['tokens_per_s_per_user']:g} tok/s | {ratio} | {a['seed_advice']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="a `pdserve profile` JSON")
    ap.add_argument("--input-len", type=int, default=1100)
    ap.add_argument("--output-len", type=int, default=140)
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--ttft-ms", type=float, default=2000.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    profile = Profile.load(args.profile)
    workload = Workload(args.input_len, args.output_len, num_requests=args.num_requests)
    result = {
        "simulated_from": args.profile,
        "profile_device": profile.meta.get("device"),
        "workload": workload.describe(),
        "ttft_ms": args.ttft_ms,
        "pairs": [compare(p, profile, workload, args.ttft_ms) for p in PAIRS],
        "advice": [ratio_advice(profile, workload, s, args.ttft_ms) for s in SEED_ADVICE],
    }
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Which layout of N GPUs serves a workload best under SLOs: simulate each one, compare goodput per GPU.

A layout's *goodput* (DistServe's definition) is the highest request rate at which at least
`attainment` (default 90%) of the requests meet every SLO; found by bisection below the layout's
saturation throughput (a faster arrival rate is not sustainable). Every candidate is simulated with the same
requests (same seed), so the comparison is between layouts, not between samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pdserve.bench.metrics import SLO
from pdserve.planning.layout import Layout, layouts_for
from pdserve.planning.profile import Profile
from pdserve.planning.report import sim_result
from pdserve.planning.simulator import SimOptions, Simulator
from pdserve.planning.workload import Workload

DEFAULT_ATTAINMENT = 0.9


def simulate(
    layout: Layout,
    profiles: dict[int, Profile],
    workload: Workload,
    slo: SLO,
    options: SimOptions = SimOptions(),
) -> dict[str, Any]:
    run = Simulator(layout, profiles, options).run(workload.requests())
    return sim_result(run, slo, layout, profiles, workload.rate)


def capacity(
    layout: Layout,
    profiles: dict[int, Profile],
    workload: Workload,
    slo: SLO,
    options: SimOptions = SimOptions(),
    attainment: float = DEFAULT_ATTAINMENT,
    iterations: int = 7,
) -> float:
    """The highest rate (req/s) at which `attainment` of the requests meet `slo`; 0: not even one alone.

    Searched below the layout's saturation throughput (every request sent at once): a higher arrival
    rate is not sustainable, its queue grows without bound, even if a finite run of requests still
    meets the SLOs (loose SLOs, few requests) before the backlog shows."""

    def meets(rate: float) -> bool:
        result = simulate(layout, profiles, workload.at_rate(rate), slo, options)
        return bool(result["slo_attainment"] >= attainment)

    alone = simulate(layout, profiles, workload.at_rate(1.0, num_requests=1), slo, options)
    if alone["slo_attainment"] < 1.0:
        return 0.0
    burst = simulate(layout, profiles, workload.at_rate(math.inf), slo, options)
    lo, hi = 0.0, float(burst["request_throughput"])
    if meets(hi):
        return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    goodput: float  # req/s at the SLO attainment
    predicted: dict[str, Any]  # the simulated run at that rate

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.layout.gpus

    def summary(self) -> dict[str, Any]:
        p = self.predicted
        keys = (
            "mean_ttft_ms",
            "p90_ttft_ms",
            "mean_tpot_ms",
            "p90_tpot_ms",
            "output_throughput",
            "slo_attainment",
        )
        return {
            "layout": str(self.layout),
            "gpus": self.layout.gpus,
            "goodput_rps": self.goodput,
            "goodput_rps_per_gpu": self.per_gpu,
            **{k: p.get(k) for k in keys},
        }


def plan(
    gpus: int,
    profiles: dict[int, Profile],
    workload: Workload,
    slo: SLO,
    options: SimOptions = SimOptions(),
    attainment: float = DEFAULT_ATTAINMENT,
) -> list[Candidate]:
    """Every layout of `gpus` GPUs with the profiled TP sizes, best goodput per GPU first."""
    out = []
    for layout in layouts_for(gpus, set(profiles)):
        rate = capacity(layout, profiles, workload, slo, options, attainment)
        at = workload.at_rate(rate if rate > 0 else 1.0)
        out.append(Candidate(layout, rate, simulate(layout, profiles, at, slo, options)))
    return sorted(out, key=lambda c: (-c.per_gpu, c.layout.disaggregated, str(c.layout)))


def verdict(ranked: list[Candidate]) -> str:
    """One plain sentence: what to run, and whether disaggregation pays here."""
    if not ranked or ranked[0].goodput <= 0:
        return "No layout meets the SLOs even with one request at a time: relax them, or add GPUs or TP."
    best = ranked[0]
    colocated = [c for c in ranked if not c.layout.disaggregated]
    pd = [c for c in ranked if c.layout.disaggregated]
    if not best.layout.disaggregated:
        other = f" (best disaggregated: {pd[0].layout}, {_ratio(pd[0], best)})" if pd else ""
        return f"Colocated serving wins: {best.layout}{other}. Disaggregation does not pay for this workload."
    other = (
        f" over the best colocated {colocated[0].layout} ({_ratio(best, colocated[0])})" if colocated else ""
    )
    return f"Disaggregate: {best.layout}{other}."


def _ratio(a: Candidate, b: Candidate) -> str:
    if b.goodput <= 0:
        return "the other meets no SLO"
    change = a.goodput / b.goodput - 1
    return f"{change:+.0%} goodput" if math.isfinite(change) else "n/a"


SPARE = 4  # instances of the other role while one role's capacity is measured: never its bottleneck


def recommend_counts(
    profile: Profile, workload: Workload, slo: SLO, attainment: float = DEFAULT_ATTAINMENT
) -> dict[str, int] | None:
    """Prefill and decode instances (at the profile's TP) that `workload.rate` needs: each role's
    capacity alone (the other role plentiful), as DistServe sizes the phases apart. None: one
    instance of some role cannot meet the SLOs at all."""
    tp, profiles = profile.tp, {profile.tp: profile}
    one_prefill = Layout(prefill=1, decode=SPARE, tp_prefill=tp, tp_decode=tp)
    one_decode = Layout(prefill=SPARE, decode=1, tp_prefill=tp, tp_decode=tp)
    per = [
        capacity(lay, profiles, workload, slo, attainment=attainment, iterations=5)
        for lay in (one_prefill, one_decode)
    ]
    if min(per) <= 0:
        return None
    return {"prefill": math.ceil(workload.rate / per[0]), "decode": math.ceil(workload.rate / per[1])}

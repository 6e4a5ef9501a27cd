"""The simulator (pdserve/planning) against closed forms, with constant-cost profiles: no model.

- M/D/1: one colocated instance serving one request a step (max_num_seqs 1, one output token) at
  Poisson rate lam with a constant step D has the Pollaczek-Khinchine mean wait
  W = lam * D^2 / (2 * (1 - lam * D)); the mean TTFT is W + D.
- A layout's capacity is monotone in its GPU count, and never above its saturation throughput.
- A pd layout moves KV: the hand-off's cost appears in TTFT, and not in a colocated one's.
"""

from __future__ import annotations

import math

import pytest

from pdserve.bench.metrics import SLO
from pdserve.planning.layout import Layout, layouts_for, parse_layout
from pdserve.planning.planner import capacity
from pdserve.planning.profile import Grid, Profile, constant_profile
from pdserve.planning.report import sim_result
from pdserve.planning.simulator import SimOptions, Simulator
from pdserve.planning.workload import Workload


def simulate(layout: str, profile: Profile, workload: Workload, **options: object) -> dict[str, object]:
    lay = parse_layout(layout)
    run = Simulator(lay, {1: profile}, SimOptions(**options)).run(workload.requests())  # type: ignore[arg-type]
    return sim_result(run, SLO(), lay, {1: profile}, workload.rate)


def test_md1_queueing_delay_matches_pollaczek_khinchine() -> None:
    service, rho = 0.010, 0.5
    lam = rho / service
    profile = constant_profile(prefill_s=service, decode_s=service, max_num_seqs=1)
    work = Workload(input_len=32, output_len=1, rate=lam, num_requests=12000, seed=0)
    result = simulate("colocated:1", profile, work)
    wait_ms = lam * service**2 / (2 * (1 - rho)) * 1000
    assert result["completed"] == 12000
    assert result["mean_ttft_ms"] - service * 1000 == pytest.approx(wait_ms, rel=0.06)
    assert result["mean_ttft_ms"] == pytest.approx(wait_ms + service * 1000, rel=0.03)


def test_capacity_is_monotone_in_gpus() -> None:
    # prefill 20 ms a step, decode 10 ms; 64 in, 16 out; SLO generous enough that only queueing fails it
    profile = constant_profile(prefill_s=0.020, decode_s=0.010, transfer_s=0.002, max_num_seqs=8)
    work = Workload(input_len=64, output_len=16, num_requests=80, seed=2)
    slo = SLO(ttft_ms=200, tpot_ms=40)
    rates = [capacity(Layout(colocated=k), {1: profile}, work, slo, iterations=5) for k in (1, 2, 4)]
    assert rates[0] > 0
    assert rates[0] < rates[1] < rates[2]
    pd = [capacity(Layout(prefill=p, decode=p), {1: profile}, work, slo, iterations=5) for p in (1, 2)]
    assert 0 < pd[0] < pd[1]


def test_capacity_never_exceeds_saturation_under_slos_a_short_run_always_meets() -> None:
    """With SLOs so loose that a finite run meets them at any arrival rate, goodput is still bounded
    by what the layout serves when every request comes at once, not by the search's reach."""
    profile = constant_profile(prefill_s=0.020, decode_s=0.010, max_num_seqs=8)
    work = Workload(input_len=64, output_len=16, num_requests=60, seed=4)
    loose = SLO(ttft_ms=1e9, tpot_ms=1e9)
    layout = Layout(colocated=1)
    burst = simulate("colocated:1", profile, work.at_rate(math.inf))["request_throughput"]
    rate = capacity(layout, {1: profile}, work, loose, iterations=5)
    assert 0 < rate <= burst  # one instance: 8 requests per 16 decode steps and their prefills
    assert rate < 100  # bounded at the pace of the steps, about 30 req/s


def test_pd_handoff_cost_appears_in_ttft() -> None:
    transfer = 0.050
    profile = constant_profile(prefill_s=0.020, decode_s=0.010, transfer_s=transfer)
    work = Workload(input_len=64, output_len=8, rate=1.0, num_requests=20, seed=3)  # one at a time
    colocated = simulate("colocated:1", profile, work)
    pd = simulate("pd:1:1", profile, work)
    assert colocated["mean_ttft_ms"] == pytest.approx(20.0, rel=0.01)
    assert pd["mean_ttft_ms"] == pytest.approx(20.0 + transfer * 1000, rel=0.01)
    assert pd["mean_tpot_ms"] == pytest.approx(10.0, rel=0.01)  # decode steps alone after the hand-off


def test_a_profile_prices_steps_between_its_points() -> None:
    grid = Grid((1.0, 3.0), (0.0, 100.0), ((1.0, 2.0), (3.0, 4.0)))
    assert grid.at(2.0, 50.0) == pytest.approx(2.5)
    assert grid.at(5.0, 0.0) == pytest.approx(5.0)  # linear beyond the last point
    profile = constant_profile(0.01, 0.02)
    assert Profile.from_json(profile.to_json()) == profile


def test_layouts_of_a_gpu_count() -> None:
    four = {str(x) for x in layouts_for(4, {1, 2})}
    assert {"colocated:4", "colocated:2@tp2", "pd:1:3", "pd:3:1", "pd:2:1@tp1,2", "pd:1:1@tp2,2"} <= four
    assert all(parse_layout(x).gpus == 4 for x in four)
    with pytest.raises(ValueError):
        parse_layout("pd:0:1")
    assert math.isclose(parse_layout("pd:2:1@tp2").gpus, 6)

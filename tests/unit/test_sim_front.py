"""What the simulator adds to TTFT outside the priced steps, against exact figures (constant-cost
profiles, no model): the profile's front, admission one step later behind a step launched ahead, and
the first token with text when some tokens have none."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.metrics import SLO
from pdserve.planning.layout import parse_layout
from pdserve.planning.profile import Front, Grid, MixedGrid, Profile, constant_profile
from pdserve.planning.report import sim_result
from pdserve.planning.simulator import SimOptions, Simulator
from pdserve.planning.workload import RequestSpec, Workload

H100_PROFILE = Path(__file__).parents[2] / "docs/bench/h100/profile-qwen2.5-7b-2026-12-07.json"


def run(
    profile: Profile, specs: list[RequestSpec], layout: str = "colocated:1", **options: Any
) -> dict[str, Any]:
    lay = parse_layout(layout)
    sim = Simulator(lay, {1: profile}, SimOptions(**options)).run(specs)
    return sim_result(sim, SLO(), lay, {1: profile}, 1.0)


@pytest.mark.parametrize("layout", ["colocated:1", "pd:1:1"])
def test_the_front_shifts_ttft_and_latency_by_exactly_its_cost(layout: str) -> None:
    base = constant_profile(prefill_s=0.020, decode_s=0.010, transfer_s=0.002, max_num_seqs=4)
    fronted = dataclasses.replace(base, front=Front(fixed_s=0.005, per_token_s=1e-5))
    # a busy run (queueing, mixed steps): every prompt the same length, so everything shifts alike
    specs = list(Workload(input_len=64, output_len=8, rate=40.0, num_requests=200, seed=3).requests())
    before, after = run(base, specs, layout), run(fronted, specs, layout)
    shift = 0.005 + 64 * 1e-5
    assert before["completed"] == after["completed"] == 200
    assert after["ttfts"] == pytest.approx([t + shift for t in before["ttfts"]], abs=1e-9)
    assert after["e2els"] == pytest.approx([t + shift for t in before["e2els"]], abs=1e-9)
    assert after["tpots"] == pytest.approx(before["tpots"], abs=1e-12)
    assert after["mean_ttft_ms"] - before["mean_ttft_ms"] == pytest.approx(shift * 1000)


def test_the_busy_front_applies_where_the_engine_is_stepping() -> None:
    """A reaches the idle engine at 4 ms: prefill [4, 24 ms), then decode steps of 10 ms (boundaries
    at 504, 514, 524 ms...); B arrives at 507 ms (the engine stepping), C at 5 s (idle). B's busy
    front of 9 ms brings it to the engine at 516 ms: it joins at 524, its mixed step of 20 ms gives
    TTFT 37 ms; with the idle figure (4 ms) it would be there at 511, join at 514: 27 ms. A and C
    pay the idle figure."""
    base = constant_profile(prefill_s=0.020, decode_s=0.010)
    specs = [RequestSpec(0.0, 32, 101), RequestSpec(0.507, 32, 2), RequestSpec(5.0, 32, 2)]
    busy = run(dataclasses.replace(base, front=Front(fixed_s=0.004, busy_fixed_s=0.009)), specs)["ttfts"]
    idle = run(dataclasses.replace(base, front=Front(fixed_s=0.004)), specs)["ttfts"]
    assert busy[1] == pytest.approx(0.037) and idle[1] == pytest.approx(0.027)
    assert busy[0] == idle[0] == pytest.approx(0.024) and busy[2] == idle[2] == pytest.approx(0.024)


def test_a_profile_without_a_front_reads_and_writes_as_before() -> None:
    stored = json.loads(H100_PROFILE.read_text())
    assert "front" not in stored
    profile = Profile.from_json(stored)
    assert profile.front == Front() and profile.front.seconds(1100) == 0.0
    assert profile.to_json() == stored  # nothing added, nothing lost
    fronted = dataclasses.replace(profile, front=Front(0.004, 2e-6, {"http": {"requests": 20.0}}))
    again = Profile.from_json(json.loads(json.dumps(fronted.to_json())))
    assert again.front == fronted.front and again.front.seconds(1000) == pytest.approx(0.006)
    with pytest.raises(ValueError):
        Front(fixed_s=-1.0)


def test_a_step_launched_ahead_admits_an_arrival_one_decode_step_later() -> None:
    """A: prefill [0, 20 ms), then decode steps of 10 ms. B arrives at 54 ms, inside [50, 60).
    Without launching ahead it joins at 60 (mixed step of 20 ms: first token at 80, TTFT 26 ms);
    with it, [60, 70) was decided when [50, 60) began, so B joins at 70: TTFT 36 ms. B arriving
    during A's prefill (not a decode-only step) waits the same either way."""
    profile = constant_profile(prefill_s=0.020, decode_s=0.010)
    for arrival, extra in ((0.054, 0.010), (0.012, 0.0)):
        specs = [RequestSpec(0.0, 32, 100), RequestSpec(arrival, 32, 4)]
        plain = run(profile, specs, launch_ahead=False)["ttfts"][1]
        ahead = run(profile, specs, launch_ahead=True)["ttfts"][1]
        assert ahead - plain == pytest.approx(extra, abs=1e-9)
    assert plain == pytest.approx(0.020 + 0.008)  # joined at A's first decode step, 20 ms of prefill


def test_launch_ahead_follows_the_profiles_device_unless_told() -> None:
    gpu = Profile.load(H100_PROFILE)
    cpu = dataclasses.replace(gpu, meta={**gpu.meta, "device": "cpu"})
    lay = parse_layout("colocated:1")
    assert Simulator(lay, {1: gpu}).both[0].launch_ahead
    assert not Simulator(lay, {1: cpu}).both[0].launch_ahead
    assert not Simulator(lay, {1: gpu}, SimOptions(launch_ahead=False)).both[0].launch_ahead


def test_ttft_counts_to_the_first_token_with_text() -> None:
    """Each token has text with chance p: the first with text comes after (1 - p) / p more decode
    steps on average (geometric), one request at a time so that nothing else moves."""
    profile = constant_profile(prefill_s=0.020, decode_s=0.010)
    specs = [RequestSpec(10.0 * i, 32, 32) for i in range(1500)]  # seeded: the same draws every run
    plain = run(profile, specs)
    seen = run(profile, specs, visible_fraction=0.25)
    assert plain["mean_ttft_ms"] == pytest.approx(20.0)
    assert seen["mean_ttft_ms"] - 20.0 == pytest.approx(3 * 10.0, rel=0.06)
    assert seen["total_output_tokens"] == plain["total_output_tokens"]  # tokens are all still counted
    # a dummy-weight profile's measured share is for comparing with its own runs, not for planning
    assert (
        run(dataclasses.replace(profile, front=Front(visible_fraction=0.25)), specs)["ttfts"]
        == plain["ttfts"]
    )
    with pytest.raises(ValueError):
        SimOptions(visible_fraction=0.0)


def test_a_measured_mixed_step_prices_a_prompt_beside_decodes() -> None:
    """As in the launch-ahead case, B joins A's decodes at 60 ms; a profile that measured a mixed
    step at 35 ms (the composed price: 20 ms) gives B its first token at 95 ms: TTFT 41 ms, and A's
    tokens around it wait as long. Alone, B's prefill is still the 20 ms of the prefill grid."""
    base = constant_profile(prefill_s=0.020, decode_s=0.010)
    mixed = dataclasses.replace(base, mixed=MixedGrid(Grid((1.0, 2.0), (1.0, 2.0), ((0.035,) * 2,) * 2), 1.0))
    specs = [RequestSpec(0.0, 32, 100), RequestSpec(0.054, 32, 4), RequestSpec(9.0, 32, 4)]
    composed, measured = run(base, specs), run(mixed, specs)
    assert composed["ttfts"][1] == pytest.approx(0.026) and measured["ttfts"][1] == pytest.approx(0.041)
    assert measured["ttfts"][2] == composed["ttfts"][2] == pytest.approx(0.020)
    assert measured["e2els"][0] - composed["e2els"][0] == pytest.approx(0.015)
    again = Profile.from_json(json.loads(json.dumps(mixed.to_json())))
    assert again.mixed == mixed.mixed

"""Planning end to end: `pdserve profile --quick` on the default model, in its own process, feeds
`pdserve simulate`, whose JSON `pdserve bench plot` draws; a real router reports the workload it
observed, which `pdserve plan --from-router` plans for, and exports recommended instance counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.bench.plot import make_plots
from pdserve.cli import main
from pdserve.planning.front_probe import measure_front, visible_fraction
from pdserve.planning.profile import Profile, constant_profile
from tests.conftest import ServerProcess
from tests.e2e.cluster import Proc, free_port, metric, wait_until
from tests.e2e.fake_instance import N_TOKENS


def test_profile_quick_feeds_simulate_and_plot(model_dir: str, tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pdserve.cli", "profile", "--quick", "--device", "cpu"]
    done = subprocess.run(
        [*cmd, "--model", model_dir, "--out", str(profile)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(profile.read_text())
    assert data["format"] == "pdserve-profile/1" and data["tp"] == 1 and data["device"] == "cpu"
    assert data["kv"]["num_blocks"] > 0 and data["kv"]["bytes_per_token"] > 0
    assert all(s > 0 for row in data["prefill"]["seconds"] + data["decode"]["seconds"] for s in row)
    assert data["transfer"]["tcp"]["bytes"][0] == 0 and {"torch", "python"} <= set(data["versions"])
    assert data["mixed"]["tokens"] == [16] and data["mixed"]["batch"] == [1]  # --quick's mixed point
    assert data["mixed"]["seconds"][0][0] > 0 and data["mixed"]["context"] == 64

    runs = {}
    for layout in ("colocated:1", "pd:1:1"):
        out = tmp_path / f"{layout.replace(':', '_')}.json"
        args = ["simulate", "--profile", str(profile), "--layout", layout, "--workload", "64:8"]
        # one at a time: 12 arrivals ~1000 s apart (simulated time) never overlap, however slow the
        # profiled steps (a slower machine once made two overlap, and the pair won by a hair)
        args += ["--request-rate", "0.001", "--num-prompts", "12", "--output", str(out)]
        assert main(args) == 0
        runs[layout] = json.loads(out.read_text())
    for run in runs.values():
        assert run["simulated"] and run["completed"] == 12 and run["mean_tpot_ms"] > 0
        assert len(run["ttfts"]) == 12 and run["total_output_tokens"] == 12 * 8
    # a pd layout moves the prompt's KV over tcp before its first token: never faster alone
    assert runs["pd:1:1"]["mean_ttft_ms"] > runs["colocated:1"]["mean_ttft_ms"]
    written = make_plots([tmp_path / "colocated_1.json", tmp_path / "pd_1_1.json"], tmp_path / "plots")
    assert all(p.stat().st_size > 0 for p in written)


def test_front_probe_times_a_real_servers_front(server: ServerProcess, tokenizer: Any) -> None:
    """Over real HTTP: the client's time to the first token is more than the engine's own time for
    the request, by what the front costs; tokenizing costs more for longer prompts; the section
    round-trips through a profile and the simulator adds it to TTFT."""
    front = measure_front(
        tokenizer,
        server.url,
        log=lambda _: None,
        requests=3,
        api_key=server.api_key,
        http_sizes=(8, 256),
        busy_streams=1,
    )
    short, long = front.source["http"]
    assert short["prompt_tokens"] < long["prompt_tokens"] and short["requests"] == 3
    assert all(0 < h["engine_s"] < h["client_ttft_s"] for h in (short, long))
    assert long["engine_s"] > short["engine_s"]  # the engine's own time, a longer prefill
    # the line through two noisy points (a loaded machine) may put its intercept at 0, never below
    assert 0 <= front.fixed_s < short["client_ttft_s"] and front.per_token_s >= 0
    busy = front.source["http_busy"]  # the same requests while a stream decodes: all counted, none lost
    assert busy["streams"] == 1 and busy["requests"] == 3 and front.busy_fixed_s is not None
    assert front.seconds(8, busy=True) == pytest.approx(front.busy_fixed_s + 8 * front.per_token_s)
    tokens, seconds = zip(*front.source["tokenize"], strict=True)
    assert list(tokens) == sorted(tokens) and seconds[-1] > seconds[0]
    profile = Profile.from_json(
        json.loads(json.dumps({**constant_profile(0.02, 0.01).to_json(), "front": front.to_json()}))
    )
    assert profile.front == front  # the slope may be 0 on a loaded machine: seconds() is checked exactly
    assert profile.front.seconds(100) == pytest.approx(front.fixed_s + 100 * front.per_token_s)
    # the default model's tokenizer knows every id of its model but a few special ones
    assert 0.99 < visible_fraction(tokenizer, len(tokenizer)) <= 1.0
    assert visible_fraction(tokenizer, 2 * len(tokenizer)) < 0.5


@pytest.mark.slow  # ~15 s on two loaded cores: beyond this file's share of the CI budget
def test_router_exports_its_workload_and_recommended_counts(tmp_path: Path) -> None:
    """A real router in front of a synthetic instance (no model): it reports what it saw at
    /pd/workload, `pdserve plan --from-router` plans for it, and /metrics carries the prefill and
    decode counts its --plan-profile says the observed rate needs."""
    profile = tmp_path / "constant.json"
    constant_profile(prefill_s=0.05, decode_s=0.01, transfer_s=0.002).save(profile)
    fake, port = free_port(), free_port()
    procs = [Proc([sys.executable, "-m", "tests.e2e.fake_instance", str(fake), "a"], tmp_path / "fake.log")]
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--health-interval", "0.3"]
    cmd += [
        "--instance",
        f"http://127.0.0.1:{fake}",
        "--plan-profile",
        str(profile),
        "--plan-slo",
        "ttft=500",
    ]
    procs.append(Proc(cmd, tmp_path / "router.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        for proc in procs:
            proc.start()
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60), procs[
            1
        ].log()
        for i in range(12):
            body = {"model": "m", "prompt": list(range(100 + 10 * i)), "max_tokens": 2 + i % 3}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        seen = httpx.get(f"{url}/pd/workload", timeout=10).json()
        assert seen["requests"] == 12 and seen["arrival_rate"] > 0
        # the fake answers N_TOKENS whatever max_tokens asked: the router records what was generated
        assert [s[1:] for s in seen["samples"]] == [[100 + 10 * i, N_TOKENS] for i in range(12)]
        assert sum(seen["input_len"]["counts"]) == 12

        out = tmp_path / "plan.json"
        args = ["plan", "--gpus", "2", "--profile", str(profile), "--from-router", url, "--num-prompts", "20"]
        assert main([*args, "--slo-ttft-ms", "500", "--output", str(out)]) == 0
        planned = json.loads(out.read_text())
        assert planned["workload"]["lengths"] == "12 observed length pairs"
        assert {r["layout"] for r in planned["ranked"]} == {"colocated:2", "pd:1:1"}

        def scraped() -> str:
            return httpx.get(f"{url}/metrics", timeout=10).text

        recommended = "pdserve_router_recommended_instances"
        assert wait_until(lambda: metric(scraped(), recommended, role="prefill") > 0, 60), procs[1].log()
        text = scraped()
        assert metric(text, "pdserve_router_recommended_instances", role="prefill") >= 1
        assert metric(text, "pdserve_router_recommended_instances", role="decode") >= 1
        assert metric(text, "pdserve_router_observed_arrival_rate") > 0
    finally:
        for proc in reversed(procs):
            proc.stop()

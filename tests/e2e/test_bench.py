"""`pdserve bench` end to end: `serve`, `sweep` and `plot` as subprocesses against a real 1P1D cluster.

`pdserve up --prefill 1 --decode 1` on the CPU model; short workloads (64-token prompts, 8 output
tokens with ignore_eos). Checked: every request completes with exactly the asked-for tokens (the
server's usage agrees with the prompt sizes the bench made), the summary agrees with the per-request
lists, percentiles are ordered, `--max-concurrency` holds, a sweep stops where SLO attainment drops,
failures are counted with their text (the run does not crash), plots are PNG files, and after every
run the instances' KV pools are free again. Then the load shapes: a constant rate with a duration limit
on the first run's prompts again (the repeat is reported, from the history file and from the server's
cached_tokens), and a run cut at its limit on salted prompts (cut requests are aborted on the server).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pdserve.bench.dataset import PromptMaker, random_requests
from pdserve.cli import main
from tests.e2e.cluster import MODEL, ROOT, SERVER_ENV, Endpoint, Launched, pdserve_up

PDSERVE = Path(sys.executable).with_name("pdserve")
BENCH_TIMEOUT_S = 180.0
INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS = 64, 8, 8
WORKLOAD = ["--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS)]
LOOSE_SLO = "ttft=600000,tpot=600000"  # ten minutes: every completed request meets it
METRICS = ("ttft", "tpot", "itl", "e2el")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    args = ["--prefill", "1", "--decode", "1", "--num-blocks", "256", "--device", "cpu"]
    with pdserve_up(tmp_path_factory.mktemp("bench-up"), *args) as launched:
        yield launched


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-out")


def bench(up: Launched | None, *args: str) -> subprocess.CompletedProcess[str]:
    """`pdserve bench ARGS` (serve and sweep get the cluster's URL); afterwards every KV pool is free."""
    base = ["--base-url", up.router_v1, "--history", ""] if up is not None else []
    done = subprocess.run(
        [str(PDSERVE), "bench", *args[:1], *base, *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        env={**os.environ, **SERVER_ENV},
    )
    if up is not None:
        instances = httpx.get(f"{up.router_url}/router/instances", timeout=10).json()["instances"]
        assert len(instances) == 2, instances
        for instance in instances:
            kv = Endpoint(instance["url"]).wait_pool_free()
            assert kv["pool_free"], f"{instance['url']}: KV blocks still held after `bench {args[0]}`: {kv}"
    return done


def ran(done: subprocess.CompletedProcess[str], rc: int = 0) -> str:
    assert done.returncode == rc, f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def inf_run(up: Launched, out: Path) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    path = out / "inf.json"
    args = [*WORKLOAD, "--ignore-eos", "--slo", LOOSE_SLO, "--label", "inf", "--output", str(path)]
    done = bench(up, "serve", *args, "--history", str(out / "history.jsonl"))
    ran(done)
    return json.loads(path.read_text()), done


@pytest.fixture(scope="module")
def chat_run(up: Launched, out: Path) -> dict[str, Any]:
    path = out / "chat.json"
    args = [*WORKLOAD, "--ignore-eos", "--endpoint", "chat", "--max-concurrency", "2", "--disable-tqdm"]
    ran(bench(up, "serve", *args, "--label", "chat-c2", "--output", str(path)))
    return dict(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def sweep_run(up: Launched, out: Path) -> tuple[dict[str, Any], str]:
    """Three rates and an SLO no request can meet (1 ms TTFT): the sweep must stop after two. At least
    one second of arrivals per rate: 6 prompts at 4 req/s, 8 at 8 req/s."""
    path = out / "sweep.json"
    args = ["--input-len", "32", "--output-len", "4", "--num-prompts", "6", "--ignore-eos", "--disable-tqdm"]
    args += ["--rates", "16,4,8", "--slo", "ttft=1", "--label", "sweep", "--output", str(path)]
    args += ["--arrival-seconds", "1"]
    stdout = ran(bench(up, "sweep", *args))
    return json.loads(path.read_text()), stdout


def check_run(r: dict[str, Any], endpoint: str) -> None:
    """Every request completed with OUTPUT_LEN tokens; the summary agrees with the per-request lists."""
    assert (r["completed"], r["failed"], r["num_prompts"]) == (NUM_PROMPTS, 0, NUM_PROMPTS), r["errors"]
    assert r["errors"] == [""] * NUM_PROMPTS and r["endpoint"] == endpoint and r["model_id"] == MODEL
    assert r["input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert r["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS  # ignore_eos: no early stop
    assert r["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    ttfts, e2els = np.array(r["ttfts"]), np.array(r["e2els"])
    assert (ttfts > 0).all() and (ttfts < e2els).all() and r["duration"] >= e2els.max()
    assert np.allclose(r["tpots"], (e2els - ttfts) / (OUTPUT_LEN - 1))
    for itl, ttft, e2el in zip(r["itls"], ttfts, e2els, strict=True):
        assert 1 <= len(itl) <= OUTPUT_LEN - 1 and ttft + sum(itl) <= e2el
    assert r["request_throughput"] == pytest.approx(NUM_PROMPTS / r["duration"])
    assert r["output_throughput"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN / r["duration"])
    assert r["mean_ttft_ms"] == pytest.approx(ttfts.mean() * 1000)
    assert r["p99_e2el_ms"] <= e2els.max() * 1000 + 1e-6
    for m in METRICS:
        assert 0 < r[f"median_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"], m
        assert r[f"mean_{m}_ms"] > 0, m


def test_serve_at_rate_inf(inf_run: tuple[dict[str, Any], subprocess.CompletedProcess[str]]) -> None:
    r, done = inf_run
    check_run(r, "completions")
    # the server counted exactly the prompt tokens the bench sized for its tokenizer
    assert r["usage_input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert r["request_rate"] == "inf" and max(r["start_times"]) < 1.0  # all sent at once
    assert r["slo"] == {"ttft_ms": 600000.0, "tpot_ms": 600000.0}
    assert r["slo_attainment"] == 1.0 and r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert r["label"] == "inf" and r["args"]["input_len"] == INPUT_LEN and "api_key" not in r["args"]
    assert datetime.datetime.fromisoformat(r["date"]).tzinfo is not None
    assert "Successful requests:" in done.stdout and "Median TPOT (ms):" in done.stdout
    assert f"{NUM_PROMPTS}/{NUM_PROMPTS}" in done.stderr  # the progress bar


def test_serve_chat_with_max_concurrency(chat_run: dict[str, Any]) -> None:
    r = chat_run
    check_run(r, "chat")
    assert r["max_concurrency"] == 2 and r["backend"] == "openai-chat"
    templated = set(r["usage_input_lens"])
    assert len(templated) == 1 and templated.pop() > INPUT_LEN  # the chat template adds tokens
    events = sorted(
        [(s + e, -1) for s, e in zip(r["start_times"], r["e2els"], strict=True)]
        + [(s, +1) for s in r["start_times"]]
    )  # at one instant an end sorts before a start
    in_flight = np.cumsum([step for _, step in events])
    assert in_flight.max() == 2, events


def test_sweep_stops_when_attainment_drops(sweep_run: tuple[dict[str, Any], str]) -> None:
    sweep, stdout = sweep_run
    assert sweep["kind"] == "sweep" and sweep["rates"] == [4.0, 8.0, 16.0] and sweep["label"] == "sweep"
    results = sweep["results"]
    assert [x["request_rate"] for x in results] == [4.0, 8.0]  # 16 req/s never ran
    assert [x["seed"] for x in results] == [0, 1]  # new prompts at each rate
    assert [(x["num_prompts"], x["completed"]) for x in results] == [(6, 6), (8, 8)]
    assert all(x["slo_attainment"] == 0.0 for x in results)
    assert "attainment" in sweep["stopped"] and "best goodput" in stdout
    assert sweep["best"]["request_rate"] == 4.0 and sweep["best"]["request_goodput"] == 0.0


def test_failures_are_counted_not_fatal(up: Launched, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (the CLI's own main), to spare a start: a wrong model name gets HTTP 404s."""
    path = out / "fail.json"
    args = ["--base-url", up.router_v1, "--model", "no-such-model", *WORKLOAD, "--disable-tqdm"]
    args += ["--history", ""]
    assert main(["bench", "serve", *args, "--output", str(path)]) == 1  # nothing completed
    r = json.loads(path.read_text())
    assert (r["completed"], r["failed"]) == (0, NUM_PROMPTS) and r["mean_ttft_ms"] is None
    assert all(e.startswith("HTTP 404") and "no-such-model" in e for e in r["errors"])
    assert f"{NUM_PROMPTS} x HTTP 404" in capsys.readouterr().out


def test_plot_makes_pngs(
    inf_run: tuple[dict[str, Any], Any],
    chat_run: dict[str, Any],
    sweep_run: tuple[dict[str, Any], str],
    out: Path,
) -> None:
    files = [str(out / f) for f in ("inf.json", "chat.json", "sweep.json")]
    stdout = ran(bench(None, "plot", *files, "--output-dir", str(out / "plots")))
    names = ["ttft_cdf", "tpot_cdf", "throughput_vs_rate", "goodput_vs_rate", "attainment_vs_rate"]
    for name in [*names, "latency_vs_rate"]:
        png = out / "plots" / f"{name}.png"
        assert f"wrote {png}" in stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_random_prompts_have_exact_token_counts(tokenizer: Any) -> None:
    requests = random_requests(tokenizer, 40, 50, 4, range_ratio=0.5, prefix_len=16, seed=3)
    maker = PromptMaker(tokenizer, random.Random(0))
    assert all(maker.count(r.prompt) == r.input_len for r in requests)
    assert {r.input_len for r in requests} <= set(range(16 + 25, 16 + 76)) and len(
        {r.input_len for r in requests}
    ) > 5
    shared = os.path.commonprefix([r.prompt for r in requests])
    assert maker.count(shared) >= 15  # the shared prefix (its last token may merge with what follows)
    assert requests == random_requests(tokenizer, 40, 50, 4, range_ratio=0.5, prefix_len=16, seed=3)
    assert requests != random_requests(tokenizer, 40, 50, 4, range_ratio=0.5, prefix_len=16, seed=4)
    long = random_requests(tokenizer, 3, 1100, 140, seed=0)
    assert [maker.count(r.prompt) for r in long] == [1100] * 3


def pools_free(up: Launched) -> None:
    for instance in httpx.get(f"{up.router_url}/router/instances", timeout=10).json()["instances"]:
        kv = Endpoint(instance["url"]).wait_pool_free()
        assert kv["pool_free"], f"{instance['url']}: KV blocks still held: {kv}"


def test_constant_rate_duration_limit_and_repeat_warning(
    up: Launched, out: Path, inf_run: tuple[dict[str, Any], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """inf_run's prompts again (same seed), in this process: 8 req/s constant for 0.6 s arrive at 0,
    1/8, ... 4/8 (5 sent, 3 not), each waited for; the history and the server both say it is a repeat."""
    path = out / "repeat.json"
    args = ["--base-url", up.router_v1, *WORKLOAD, "--ignore-eos", "--disable-tqdm", "--output", str(path)]
    args += ["--request-rate", "8", "--arrival", "constant", "--duration", "0.6"]
    assert main(["bench", "serve", *args, "--history", str(out / "history.jsonl")]) == 0
    r = json.loads(path.read_text())
    assert (r["sent"], r["not_sent"], r["cut"], r["completed"], r["failed"]) == (5, 3, 0, 5, 0)
    assert (r["arrival"], r["duration_limit"], r["at_duration"]) == ("constant", 0.6, "wait")
    assert np.diff(r["start_times"]) == pytest.approx([0.125] * 4, abs=0.06)
    assert r["prompts_fingerprint"] == inf_run[0]["prompts_fingerprint"]
    assert all(c >= 48 for c in r["cached_input_lens"]), r["cached_input_lens"]  # 3 blocks of 16 at least
    history, cache = r["warnings"]
    assert "sent to this server before" in history and "(inf)" in history and "--prefix-salt" in history
    assert cache.startswith("5 of 5 requests found more of their prompt in the server's prefix cache")
    assert f"WARNING: {history}" in capsys.readouterr().out
    eq = r["equivalents"]
    assert eq["aiperf"]["time_to_first_token"] == pytest.approx(r["mean_ttft_ms"])
    assert eq["guidellm"]["time_per_output_token_ms"] > eq["guidellm"]["inter_token_latency_ms"] > 0
    pools_free(up)


def test_cut_at_the_limit_on_salted_prompts(
    up: Launched, out: Path, inf_run: tuple[dict[str, Any], Any]
) -> None:
    """Two in flight from t=0, 64 tokens each (seconds on this CPU), cut at 0.5 s: the run ends then, the
    cut requests are aborted on the server (pools free), and the salted prompts are new to it."""
    path = out / "cut.json"
    args = ["--base-url", up.router_v1, "--input-len", "64", "--output-len", "64", "--num-prompts", "8"]
    args += ["--ignore-eos", "--max-concurrency", "2", "--duration", "0.5", "--at-duration", "cut"]
    args += ["--prefix-salt", "auto", "--history", str(out / "history.jsonl"), "--disable-tqdm"]
    assert main(["bench", "serve", *args, "--output", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["cut"] >= 1 and r["completed"] + r["cut"] == r["sent"] and r["not_sent"] == 8 - r["sent"]
    assert (
        r["failed"] == 0
        and r["duration"] < 2.0
        and r["errors"].count("cut at the duration limit") == r["cut"]
    )
    assert len(r["prefix_salt"]) == 8 and r["prompts_fingerprint"] != inf_run[0]["prompts_fingerprint"]
    assert r["warnings"] == []
    pools_free(up)

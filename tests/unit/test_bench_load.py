"""`pdserve bench` load shapes and metric definitions, without a model.

Arrival schedules (constant rate exact; Poisson mean and variance under a seed; prompts enough for a
duration), the duration limit of a real run (wait vs cut, what is not sent) against a small SSE server on
a real socket whose answers take a known time, the guidellm / aiperf definitions on hand-made timelines,
and the repeat evidence (history file, cached tokens).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from typing import Any

import numpy as np
import pytest

from pdserve.bench.arrivals import arrival_offsets, prompts_for_duration
from pdserve.bench.client import RequestResult, Target
from pdserve.bench.dataset import BenchRequest
from pdserve.bench.definitions import EQUIVALENTS, definitions, equivalents
from pdserve.bench.metrics import SLO, format_table, summarize
from pdserve.bench.repeats import History, fingerprint, repeat_warnings, unexplained_cache_hits
from pdserve.bench.runner import Load, RunOutcome, run_requests

# ---- arrival schedules ------------------------------------------------------------------------------------


def test_constant_rate_is_exact_and_ignores_the_seed() -> None:
    assert arrival_offsets(5, 4.0, random.Random(0), "constant") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert arrival_offsets(1000, 3.0, random.Random(1), "constant")[999] == pytest.approx(333.0)
    assert arrival_offsets(7, 2.0, random.Random(1), "constant") == arrival_offsets(
        7, 2.0, random.Random(2), "constant"
    )
    assert arrival_offsets(3, math.inf, random.Random(0), "constant") == [0.0] * 3
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, random.Random(0), "gamma")


def test_poisson_counts_have_mean_and_variance_rate_times_window() -> None:
    rate = 5.0
    offsets = arrival_offsets(50_000, rate, random.Random(11), "poisson")
    counts = np.bincount(np.floor(offsets).astype(int))[:-1]  # arrivals per whole second
    assert counts.mean() == pytest.approx(rate, rel=0.02)
    assert counts.var() == pytest.approx(rate, rel=0.08)  # Poisson: variance == mean
    gaps = np.diff(offsets)
    assert gaps.var() == pytest.approx(1 / rate**2, rel=0.05)  # exponential gaps
    assert offsets == arrival_offsets(50_000, rate, random.Random(11), "poisson")
    assert offsets[1:50] != arrival_offsets(50, rate, random.Random(12), "poisson")[1:]


def test_prompts_for_a_duration_cover_it() -> None:
    assert prompts_for_duration(2.0, 3.0, "constant") == 6  # arrivals 0, 0.5, ... 2.5
    assert prompts_for_duration(3.0, 0.5, "constant") == 2  # 0 and 1/3
    assert prompts_for_duration(math.inf, 10.0) is None
    n = prompts_for_duration(4.0, 5.0, "poisson")
    assert n is not None and n > 20
    for seed in range(300):  # arrivals before the limit never outnumber the prompts made
        offsets = arrival_offsets(n + 50, 4.0, random.Random(seed), "poisson")
        assert sum(t < 5.0 for t in offsets) <= n


# ---- the duration limit, against a server on a real socket -------------------------------------------------

CHUNK_S, CHUNKS = 0.15, 6  # every answer: 6 text chunks 0.15 s apart, so 0.9 s after it is sent


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 request -> a close-delimited SSE stream of CHUNKS chunks, CHUNK_S apart."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
    try:
        for i in range(CHUNKS):
            await asyncio.sleep(CHUNK_S)
            chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": CHUNKS}}
        writer.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await writer.drain()
    except ConnectionError:
        pass  # the client cut the request
    finally:
        writer.close()


def run_against_server(load: Load, num: int = 8) -> RunOutcome:
    async def go() -> RunOutcome:
        server = await asyncio.start_server(_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = Target(f"http://127.0.0.1:{port}", "completions", "m", timeout=30.0)
        requests = [BenchRequest(f"p{i}", 3, CHUNKS) for i in range(num)]
        async with server:
            return await run_requests(target, requests, load, seed=0, progress=False)

    return asyncio.run(go())


def test_duration_limit_waits_for_requests_in_flight() -> None:
    """Arrivals at 0, 0.5, 1.0, 1.5 (2.0 is past the 1.7 s limit); answers end 0.9 s after each."""
    out = run_against_server(Load(rate=2.0, arrival="constant", duration=1.7, at_limit="wait"))
    assert (len(out.results), out.not_sent, out.cut, out.drained) == (4, 4, 0, 2)
    assert all(r.success and r.output_len == CHUNKS for r in out.results)
    assert [r.start - out.start for r in out.results] == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=0.1)
    assert out.duration > 2.3 and not out.ran_out  # the last answer ends near 2.4 s


def test_duration_limit_cuts_requests_in_flight() -> None:
    out = run_against_server(Load(rate=2.0, arrival="constant", duration=1.7, at_limit="cut"))
    assert (len(out.results), out.not_sent, out.cut) == (4, 4, 2)
    assert [r.success for r in out.results] == [True, True, False, False]
    assert [r.cut for r in out.results] == [False, False, True, True]
    assert out.results[2].ttft is not None and len(out.results[2].itl) < CHUNKS - 1  # partly measured
    assert 1.6 < out.duration < 2.1  # ends at the limit, not at 2.4 s
    s = summarize(out.results, out.duration, SLO(ttft_ms=1e6))
    assert (s["completed"], s["failed"], s["cut"]) == (2, 0, 2)
    assert s["slo_attainment"] == 1.0  # cut requests are neither good nor bad


def test_duration_limit_under_a_concurrency_cap() -> None:
    """One slot: the 1st answer ends at 0.9 s, the 2nd is cut at 1.2 s, the 3rd never got a slot."""
    out = run_against_server(Load(max_concurrency=1, duration=1.2, at_limit="cut"))
    assert (len(out.results), out.not_sent, out.cut) == (2, 6, 1)
    assert out.results[0].success and out.results[1].cut


def test_prompts_running_out_before_the_limit_is_reported() -> None:
    out = run_against_server(Load(rate=10.0, arrival="constant", duration=5.0), num=2)
    assert out.ran_out and out.not_sent == 0 and len(out.results) == 2


def test_load_validates() -> None:
    with pytest.raises(ValueError):
        Load(at_limit="drop")
    with pytest.raises(ValueError):
        Load(duration=0.0)


# ---- metric definitions on hand-made timelines ---------------------------------------------------------


def timeline(ttft: float, gaps: list[float], tail: float, tokens: int) -> RequestResult:
    """Sent at 0; first chunk at ttft; then `gaps`; [DONE] `tail` after the last chunk."""
    latency = ttft + sum(gaps) + tail
    return RequestResult(3, tokens, success=True, ttft=ttft, itl=gaps, latency=latency, output_len=tokens)


def test_each_tools_per_token_metrics_on_known_timelines() -> None:
    a = timeline(0.5, [0.1, 0.1, 0.1], 0.05, 4)  # last chunk at 0.8 s, [DONE] at 0.85 s
    b = timeline(0.2, [0.3], 0.0, 2)  # last chunk and [DONE] at 0.5 s
    assert a.tpot == pytest.approx(0.35 / 3)  # ours: to [DONE], first token excluded
    s = summarize([a, b], duration=2.0, slo=SLO())
    gl, ap = s["equivalents"]["guidellm"], s["equivalents"]["aiperf"]
    assert gl["time_to_first_token_ms"] == ap["time_to_first_token"] == pytest.approx(350.0)
    # (last - first chunk) / (n - 1): 100 ms and 300 ms; guidellm weights by n - 1, aiperf does not
    assert gl["inter_token_latency_ms"] == pytest.approx((100 * 3 + 300 * 1) / 4)
    assert ap["inter_token_latency"] == pytest.approx((100 + 300) / 2)
    # guidellm's TPOT: (last chunk - send) / n, weighted by n: 200 ms x 4 and 250 ms x 2
    assert gl["time_per_output_token_ms"] == pytest.approx((200 * 4 + 250 * 2) / 6)
    assert gl["request_latency"] == pytest.approx((0.85 + 0.5) / 2)  # seconds, to [DONE]
    assert ap["request_latency"] == pytest.approx((800 + 500) / 2)  # ms, to the last chunk
    assert ap["inter_chunk_latency"] == pytest.approx(s["mean_itl_ms"]) == pytest.approx(150.0)
    assert ap["output_token_throughput_per_user"] == pytest.approx((10 + 1 / 0.3) / 2)
    assert gl["output_tokens_per_second (per request)"] == pytest.approx((4 / 0.85 + 2 / 0.5) / 2)
    assert gl["output_tokens_per_second"] == ap["output_token_throughput"] == pytest.approx(3.0)  # 6 / 2 s
    assert s["mean_tpot_ms"] == pytest.approx((350 / 3 + 300) / 2)  # ours differs from both ITLs


def test_definitions_are_in_the_table_and_the_json() -> None:
    s = summarize([timeline(0.5, [0.1, 0.1], 0.0, 3)], duration=1.0, slo=SLO())
    table = format_table(s)
    assert "guidellm:" in table and "aiperf:" in table and "time_per_output_token_ms" in table
    rows = definitions()
    assert {(r["tool"], r["metric"]) for r in rows} >= {(e.tool, e.name) for e in EQUIVALENTS}
    assert all(r["formula"] and r["ours"] for r in rows)
    json.dumps(rows)
    empty = equivalents([], 0.0)
    assert (
        empty["aiperf"]["inter_token_latency"] is None and empty["guidellm"]["output_tokens_per_second"] == 0
    )


# ---- repeats ---------------------------------------------------------------------------------------------


def test_history_finds_a_repeat_per_server_and_prompts(tmp_path: Any) -> None:
    history = History.at(str(tmp_path / "h" / "history.jsonl"))
    assert history is not None and History.at("") is None
    prompts = [BenchRequest("a b c", 3, 4), BenchRequest("d e", 2, 4)]
    fp = fingerprint(prompts)
    assert fp == fingerprint(list(prompts)) and fp != fingerprint([BenchRequest("a b c", 3, 5), prompts[1]])
    assert history.earlier("http://s", "m", fp) is None
    history.record("http://s", "m", fp, "first")
    with history.path.open("a") as f:
        f.write("{torn\n")
    earlier = history.earlier("http://s", "m", fp)
    assert earlier is not None and earlier["label"] == "first"
    assert history.earlier("http://other", "m", fp) is None
    warnings = repeat_warnings(earlier, 0, 2)
    assert len(warnings) == 1 and "first" in warnings[0] and "--prefix-salt" in warnings[0]
    assert repeat_warnings(None, 0, 2) == []


def test_cache_hits_beyond_the_template_and_shared_prefix_count() -> None:
    def hit(cached: int, usage_input: int, input_len: int = 64) -> RequestResult:
        r = timeline(0.1, [0.1], 0.0, 2)
        r.input_len, r.usage_input_len, r.cached_input_len = input_len, usage_input, cached
        return r

    # chat template adds 30 tokens; a 16-token shared prefix: up to 46 cached is this run's own doing
    results = [hit(32, 94), hit(46, 94), hit(48, 94), hit(0, 94)]
    assert unexplained_cache_hits(results, prefix_len=16) == 1
    assert unexplained_cache_hits(results, prefix_len=0) == 3
    assert "1 of 4 requests" in repeat_warnings(None, 1, 4)[0]

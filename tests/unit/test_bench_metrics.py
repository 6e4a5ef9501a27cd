"""`pdserve bench` without a server: the metrics math on hand-made results, and the small pieces under it.

Metrics: percentiles, TPOT (none for a 1-token answer), goodput and SLO attainment (failures count
against it), the per-request lists. Then the stream parser of one request, against an in-process
httpx.MockTransport (text chunks, usage, error events, HTTP errors, a stream that stalls past the
timeout), Poisson arrivals, and the sweep's stop rule.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from pdserve.bench.arrivals import arrival_offsets
from pdserve.bench.client import RequestResult, Target, normalize_base_url, payload, send
from pdserve.bench.dataset import BenchRequest, sample_lengths
from pdserve.bench.metrics import (
    SLO,
    distribution,
    error_summary,
    format_table,
    parse_slo,
    per_request,
    summarize,
)
from pdserve.bench.sweep import best_point, geometric_rates, parse_rates, prompts_for_rate, run_sweep


def done(ttft: float, latency: float, output_len: int, input_len: int = 10) -> RequestResult:
    """A completed request whose tokens arrived evenly between TTFT and the end."""
    gap = (latency - ttft) / (output_len - 1) if output_len > 1 else 0.0
    return RequestResult(
        input_len, output_len, success=True, ttft=ttft, itl=[gap] * (output_len - 1), latency=latency,
        output_len=output_len,
    )  # fmt: skip


def failed(error: str = "HTTP 503: busy") -> RequestResult:
    return RequestResult(10, 5, success=False, error=error, latency=0.01)


# ---- metrics --------------------------------------------------------------------------------------------


def test_distribution_matches_numpy_percentiles_in_ms() -> None:
    seconds = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    d = distribution("ttft", seconds)
    assert d["mean_ttft_ms"] == pytest.approx(50.5)
    assert d["median_ttft_ms"] == pytest.approx(50.5)
    assert d["p90_ttft_ms"] == pytest.approx(90.1)
    assert d["p99_ttft_ms"] == pytest.approx(99.01)
    assert d["std_ttft_ms"] == pytest.approx(float(np.std(np.arange(1, 101))))


def test_distribution_of_nothing_is_none() -> None:
    assert set(distribution("itl", []).values()) == {None}


def test_tpot_excludes_the_first_token_and_a_one_token_answer_has_none() -> None:
    assert done(ttft=0.2, latency=1.0, output_len=5).tpot == pytest.approx(0.2)
    assert done(ttft=0.2, latency=0.2, output_len=1).tpot is None
    assert failed().tpot is None


def test_summary_counts_throughput_goodput_and_attainment() -> None:
    results = [
        done(ttft=0.1, latency=0.5, output_len=5),  # good
        done(ttft=0.1, latency=0.1, output_len=1),  # good: no TPOT, so it meets any TPOT SLO
        done(ttft=0.9, latency=1.3, output_len=5),  # TTFT 900 ms > 500 ms
        done(ttft=0.1, latency=2.1, output_len=5),  # TPOT 500 ms > 200 ms
        failed(),
    ]
    s = summarize(results, duration=2.0, slo=SLO(ttft_ms=500, tpot_ms=200))
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["total_input_tokens"] == 40 and s["total_output_tokens"] == 16  # failures count no tokens
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["request_goodput"] == pytest.approx(1.0)  # 2 good requests in 2 s
    assert s["slo_attainment"] == pytest.approx(2 / 5)  # the failure counts against it
    assert s["output_throughput"] == pytest.approx(8.0)
    assert s["total_token_throughput"] == pytest.approx(28.0)
    # TPOT over the three multi-token answers only: 100, 100, 500 ms
    assert s["mean_tpot_ms"] == pytest.approx(700 / 3)
    assert s["median_tpot_ms"] == pytest.approx(100.0)
    assert s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["mean_e2el_ms"] == pytest.approx(1000.0)
    assert s["mean_itl_ms"] == pytest.approx((4 * 100 + 4 * 100 + 4 * 500) / 12)


def test_without_slo_every_completed_request_is_good() -> None:
    s = summarize([done(5.0, 60.0, 3), failed()], duration=4.0, slo=SLO())
    assert s["request_goodput"] == s["request_throughput"] == pytest.approx(0.25)
    assert s["slo_attainment"] == pytest.approx(0.5)


def test_e2el_slo_and_limits_are_inclusive() -> None:
    r = done(ttft=0.5, latency=1.0, output_len=3)
    assert SLO(ttft_ms=500, tpot_ms=250, e2el_ms=1000).met_by(r)
    assert not SLO(e2el_ms=999).met_by(r)
    assert not SLO().met_by(failed())


def test_summary_of_only_failures_has_no_latencies() -> None:
    s = summarize([failed(), failed("timeout")], duration=1.0, slo=SLO())
    assert s["completed"] == 0 and s["slo_attainment"] == 0.0 and s["mean_ttft_ms"] is None
    assert "-" in format_table(s)
    assert error_summary(per_request([failed(), failed(), failed("timeout")])["errors"]).splitlines() == [
        "2 x HTTP 503: busy",
        "1 x timeout",
    ]


def test_per_request_lists_keep_order_and_mark_failures() -> None:
    results = [done(0.1, 0.5, 5), failed(), done(0.2, 0.2, 1)]
    results[1].start = 3.0
    lists = per_request(results, run_start=1.0)
    assert lists["ttfts"] == [0.1, None, 0.2]
    assert lists["tpots"][1:] == [None, None] and lists["tpots"][0] == pytest.approx(0.1)
    assert lists["output_lens"] == [5, 0, 1]
    assert lists["itls"][1] == [] and len(lists["itls"][0]) == 4
    assert lists["e2els"] == [0.5, None, 0.2]
    assert lists["errors"] == ["", "HTTP 503: busy", ""]
    assert lists["start_times"][1] == pytest.approx(2.0)
    json.dumps(lists, allow_nan=False)


def test_format_table_shows_values() -> None:
    s = summarize([done(0.1, 0.5, 5)], duration=1.0, slo=SLO())
    table = format_table(s)
    assert "Successful requests:" in table and "Median TTFT (ms):" in table and "P99 TPOT (ms):" in table
    assert "100.00" in table  # TTFT and TPOT of 100 ms


def test_parse_slo() -> None:
    assert parse_slo("ttft=500, tpot:50.5") == SLO(ttft_ms=500, tpot_ms=50.5)
    assert parse_slo("e2el=2000").as_dict() == {"e2el_ms": 2000}
    assert parse_slo("") == SLO()
    for bad in ("ttft", "latency=5", "ttft=-1", "ttft=fast"):
        with pytest.raises(ValueError):
            parse_slo(bad)


# ---- one streamed request, against a mock server ----------------------------------------------------------


def sse(*events: Any) -> list[bytes]:
    return [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]


class SlowStream(httpx.AsyncByteStream):
    """Event-stream bytes with a pause before each piece (`pause` seconds)."""

    def __init__(self, pieces: list[bytes], pause: float) -> None:
        self.pieces, self.pause = pieces, pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(self.pause)
            yield piece


def run_one(answer: httpx.Response, endpoint: str = "completions", timeout: float = 10.0) -> RequestResult:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return answer

    async def go() -> RequestResult:
        target = Target("http://bench.test", endpoint, "m", api_key="k", ignore_eos=True, timeout=timeout)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send(client, target, BenchRequest("hello", 3, 4))

    result = asyncio.run(go())
    assert seen and seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}
    return result


def completion(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def test_stream_timing_and_usage() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    events = sse(*(completion(t) for t in ("a", "b", "c")), usage, "[DONE]")
    r = run_one(httpx.Response(200, stream=SlowStream(events, 0.05)))
    assert r.success and r.error == ""
    assert r.output_len == 4 and r.usage_input_len == 3  # from usage, not from the 3 chunks
    assert r.ttft is not None and 0.04 < r.ttft < r.latency
    assert len(r.itl) == 2 and all(0.04 < gap < 1.0 for gap in r.itl)
    assert r.tpot == pytest.approx((r.latency - r.ttft) / 3)


def test_chat_opening_chunk_is_not_a_token_and_counts_fall_back_to_chunks() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    r = run_one(httpx.Response(200, stream=SlowStream(sse(role, token, token, "[DONE]"), 0.05)), "chat")
    assert r.success and r.output_len == 2 and len(r.itl) == 1
    assert r.ttft is not None and r.ttft > 0.09  # the clock ran past the role chunk, to the first text


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (httpx.Response(503, json={"error": {"message": "busy"}}), "HTTP 503"),
        (httpx.Response(200, content=b"".join(sse(completion("a")))), "without [DONE]"),
        (httpx.Response(200, content=b"".join(sse({"error": {"message": "boom"}}))), "boom"),
        (httpx.Response(200, content=b"".join(sse("[DONE]"))), "no generated text"),
        (httpx.Response(200, content=b"data: {not json\n\n"), "JSONDecodeError"),
    ],
)
def test_failures_become_error_text(answer: httpx.Response, expected: str) -> None:
    r = run_one(answer)
    assert not r.success and expected in r.error and r.tpot is None


def test_a_stalled_stream_ends_at_the_timeout() -> None:
    stalled = httpx.Response(200, stream=SlowStream(sse(completion("a"), "[DONE]"), 5.0))
    r = run_one(stalled, timeout=0.3)
    assert not r.success and r.error.startswith("timeout") and r.latency < 2.0


def test_a_refused_connection_is_an_error_not_a_crash() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
            return await send(client, Target("http://x", "chat", "m"), BenchRequest("p", 1, 1))

    r = asyncio.run(go())
    assert not r.success and "ConnectError" in r.error


def test_payload_and_base_url() -> None:
    target = Target("http://h", "chat", "m", ignore_eos=False)
    body = payload(target, BenchRequest("hi", 1, 7))
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_tokens"] == 7
    assert "ignore_eos" not in body and "prompt" not in body
    assert normalize_base_url("http://h:8/v1/") == normalize_base_url("http://h:8") == "http://h:8"


# ---- arrivals, lengths, the sweep ---------------------------------------------------------------------


def test_arrivals_all_at_once_or_poisson() -> None:
    assert arrival_offsets(4, math.inf, random.Random(0)) == [0.0] * 4
    offsets = arrival_offsets(4000, 8.0, random.Random(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 8, rel=0.1)  # exponential: std == mean
    assert offsets == arrival_offsets(4000, 8.0, random.Random(0))
    with pytest.raises(ValueError):
        arrival_offsets(1, 0.0, random.Random(0))


def test_sample_lengths_stay_in_range() -> None:
    rng = random.Random(1)
    assert sample_lengths(rng, 5, 100, 0.0) == [100] * 5
    lens = sample_lengths(rng, 2000, 100, 0.5)
    assert min(lens) == 50 and max(lens) == 150
    assert sample_lengths(rng, 50, 1, 0.9) == [1] * 50


def sweep_point(rate: float, goodput: float, attainment: float) -> dict[str, Any]:
    return {
        "request_rate": rate, "request_goodput": goodput, "slo_attainment": attainment,
        "request_throughput": rate, "output_throughput": 10 * rate,
    }  # fmt: skip


def test_sweep_stops_below_min_attainment_after_at_least_two_rates() -> None:
    curve = {1.0: (0.4, 0.1), 2.0: (1.9, 0.95), 4.0: (3.0, 0.75), 8.0: (2.0, 0.25), 16.0: (0.5, 0.03)}
    ran: list[tuple[float, int]] = []

    def run_at(rate: float, index: int) -> dict[str, Any]:
        ran.append((rate, index))
        return sweep_point(rate, *curve[rate])

    sweep = run_sweep(run_at, [16.0, 4.0, 1.0, 8.0, 2.0], min_attainment=0.5)
    # 1 req/s is below the bar but is the first rate; 8 req/s is the first below it after that
    assert ran == [(1.0, 0), (2.0, 1), (4.0, 2), (8.0, 3)]
    assert "0.25 < 0.5" in sweep["stopped"]
    assert sweep["best"]["request_rate"] == 4.0 and sweep["best"]["request_goodput"] == 3.0


def test_sweep_runs_every_rate_when_the_slo_holds() -> None:
    sweep = run_sweep(lambda rate, i: sweep_point(rate, rate, 1.0), [1.0, 2.0, 3.0], min_attainment=0.5)
    assert len(sweep["results"]) == 3 and sweep["stopped"] == "every rate ran"
    assert best_point([sweep_point(2.0, 1.0, 1.0), sweep_point(1.0, 1.0, 1.0)])["request_rate"] == 1.0
    assert best_point([]) is None


def test_rate_lists() -> None:
    assert parse_rates("4, 0.5,1,inf,1") == [0.5, 1.0, 4.0, math.inf]
    assert geometric_rates(0.5, 2.0, 4) == [0.5, 1.0, 2.0, 4.0]
    for bad in ("", "0,1", "fast"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    with pytest.raises(ValueError):
        geometric_rates(1.0, 1.0, 3)


def test_plot_finds_sweeps_among_result_files(tmp_path: Any) -> None:
    from pdserve.bench.plot import load

    def write(name: str, data: dict[str, Any]) -> str:
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    files = [
        write("a2.json", {"label": "a", "request_rate": 2.0}),
        write("a1.json", {"label": "a", "request_rate": 1.0}),
        write("b.json", {"label": "b", "request_rate": "inf"}),
        write("c.json", {"label": "c", "results": [{"request_rate": 4.0}, {"request_rate": "inf"}]}),
        write("d.json", {"request_rate": 1.0}),
    ]
    runs, series = load(files)
    assert [run.name for run in runs] == ["a", "a", "b", "c @ 4 req/s", "c @ inf", "d"]
    assert set(series) == {"a", "c"}  # b and d: one run each; inf has no place on a rate axis
    assert [r["request_rate"] for r in series["a"]] == [1.0, 2.0]
    assert [r["request_rate"] for r in series["c"]] == [4.0]


def test_prompts_for_rate_keeps_arrivals_long_enough() -> None:
    assert prompts_for_rate(2.0, 64, None) == 64  # no floor: the fixed count
    assert prompts_for_rate(2.0, 64, 30.0) == 64  # 64 prompts at 2 req/s already arrive over 32 s
    assert prompts_for_rate(16.0, 64, 30.0) == 480  # else rate x seconds
    assert prompts_for_rate(0.5, 10, 3.0) == 10
    assert prompts_for_rate(float("inf"), 64, 30.0) == 64  # all at once: seconds mean nothing

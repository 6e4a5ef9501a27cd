"""Counters that counted wrong (issue 29, item 7), against the session's real instance (`server`) and
real `pdserve router` processes in front of it: a non-streamed client disconnect counts `abort` once;
an instance's 400 with a null `code` is labelled by its `type` in the router's errors counter; a 503
from the router's own /health is no client request, so it is not counted as an error.
(The 1P1D counters, KV bytes and transfer times, are in test_disagg.py, on its cluster.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, MODEL, ServerProcess
from tests.e2e.cluster import Proc, free_port, metric, wait_until

ERRORS = "pdserve_router_errors_total"


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """start_router(*args) -> the URL of a running `pdserve router` (stopped at teardown)."""
    procs: list[Proc] = []

    def start(*args: str) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), *args]
        proc = Proc(cmd, tmp_path / f"router-{len(procs)}.log").start()
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        up = lambda: not proc.alive or httpx.get(f"{url}/router/instances", timeout=2).status_code < 500  # noqa: E731
        assert wait_until(up, 30) and proc.alive, proc.log()
        return url

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()


def test_non_streamed_disconnect_counts_abort_once(server: ServerProcess) -> None:
    def aborts() -> float:
        return metric(
            httpx.get(f"{server.url}/metrics", headers=server.headers).text,
            "pdserve_requests_total",
            outcome="abort",
        )

    before = aborts()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/completions", json=body, headers=server.headers, timeout=2.0)
    assert server.wait_pool_free()["pool_free"]
    assert wait_until(lambda: aborts() > before, 5)
    time.sleep(0.5)  # a second count would follow the first at once
    assert aborts() == before + 1


def test_router_error_kinds(server: ServerProcess, start_router: Callable[..., str]) -> None:
    router = start_router("--instance", server.url, "--api-key", API_KEY, "--health-interval", "0.5")
    assert wait_until(lambda: httpx.get(f"{router}/health", timeout=2).status_code == 200, 15)
    bad = {"model": MODEL, "prompt": "Hi", "temperature": -1}
    answer = httpx.post(f"{router}/v1/completions", json=bad, headers=server.headers, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] is None, answer.text
    errors = httpx.get(f"{router}/metrics", headers=server.headers, timeout=10).text
    assert metric(errors, ERRORS, kind="upstream_invalid_request_error") == 1, errors
    assert metric(errors, ERRORS, kind="upstream_error") == 0, errors

    alone = start_router("--instance", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for _ in range(3):
        assert httpx.get(f"{alone}/health", timeout=5).status_code == 503
    assert metric(httpx.get(f"{alone}/metrics", timeout=10).text, ERRORS) == 0  # health checks
    answer = httpx.post(f"{alone}/v1/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=10)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_instance"
    assert metric(httpx.get(f"{alone}/metrics", timeout=10).text, ERRORS, kind="no_instance") == 1

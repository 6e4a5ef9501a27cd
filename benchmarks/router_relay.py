"""One router's relay capacity on one core: streams/s and chunks/s it forwards, and the latency it adds.

    synthetic backend (core 1) <── router (core 0, `pdserve router --instance`) <── load generator (core 1)
                               <─────────────── the same load, direct ───────────┘

The backend is written for this benchmark only: a raw-asyncio HTTP/1.1 server that answers every
POST with an OpenAI chat stream of --chunks events, one every --interval-ms, each stamped with
time.monotonic_ns() (one clock for every process of the machine), so the load generator measures each
chunk's delivery latency. Asked with X-PDServe-Resumable (the router asks for streams of one choice), it
marks every event with an `id:` line as pdserve's instances do; the last event has a finish_reason.
The load generator keeps S streams open at a time (closed loop, keep-alive connections), first straight
at the backend, then through the router, for each S in --levels.
The router runs pinned to one core (taskset); its CPU use per run comes from /proc. It runs once per
--routers entry LABEL=CLIENT[@SRC]: the router's code from SRC (a checkout's root, first on its
PYTHONPATH; default: this tree), with CLIENT "-" as it is, else with the httpx/httpx2 module it imports
aliased to CLIENT (for code from before the router moved to aiohttp: httpx 0.x, whose httpcore 1.0 pool
is O(n^2) in open connections, or httpx2, a fork with a linear pool). A last run per entry at
--profile-level repeats the router under cProfile, between two signals (steady state), and lists its
top costs. Before/after a change, in one run (the base's code exported by git):

    mkdir -p /tmp/base && git archive BASE_COMMIT pdserve | tar -x -C /tmp/base
    .venv/bin/python benchmarks/router_relay.py --routers before=-@/tmp/base,after=-
    (a base from before the aiohttp upstream: before=httpx@/tmp/base)

On a shared machine the router's CPU per chunk moves with how much CPU it gets (a starved router
handles more events per loop turn): repeat each entry (before=...,after=...,before2=...,after2=...) and
compare the levels where every entry kept the same chunks/s; --profile-level 0 skips the cProfile runs.

    .venv/bin/python benchmarks/router_relay.py [--chunks 64] [--interval-ms 10] [--levels 1,32,128,256]
        [--routers router=-] [--policy round_robin] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import free_port, wait_healthy  # benchmarks/ is sys.path[0]

STAMP = b'"t_ns":'

# ---- the synthetic backend ------------------------------------------------------------------------------


def chunk_event(i: int, last: bool, marked: bool) -> bytes:
    body = {
        "id": "chatcmpl-synthetic",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "synthetic",
        "choices": [
            {"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": "stop" if last else None}
        ],
        "t_ns": time.monotonic_ns(),
    }
    mark = b"id: %d:%d\n" % (6 * (i + 1), 1000 + i) if marked else b""  # chars so far : this token's id
    return mark + b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes, bytes]:
    """Method, path, body and the head (lower case)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return method, path, body, head.lower()


def plain(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def stream_answer(writer: asyncio.StreamWriter, chunks: int, interval: float, marked: bool) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(chunks):
        writer.write(http_chunk(chunk_event(i, i == chunks - 1, marked)))
        await writer.drain()
        if interval:
            await asyncio.sleep(interval)
    writer.write(http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int, interval: float
) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            method, path, _, head = await read_request(reader)
            if method == "POST":
                await stream_answer(writer, chunks, interval, b"x-pdserve-resumable: 1" in head)
            elif path == "/health":
                writer.write(plain("200 OK", b'{"status":"ok"}'))
            elif path == "/v1/models":
                writer.write(plain("200 OK", b'{"object":"list","data":[{"id":"synthetic"}]}'))
            else:  # /pd/info among them: a 404 reads as a colocated instance without load reports
                writer.write(plain("404 Not Found", b'{"error":{"message":"not found"}}'))
            await writer.drain()
    writer.close()


async def run_backend(port: int, chunks: int, interval: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, chunks, interval), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


# ---- the load generator ---------------------------------------------------------------------------------


@dataclass
class Load:
    """What one run at one concurrency saw inside its window [start_ns, end_ns) (monotonic clock)."""

    start_ns: int
    end_ns: int
    streams: int = 0  # ended inside the window
    chunks: int = 0  # received inside the window
    errors: int = 0
    latencies_us: list[float] = field(default_factory=list)

    def counts(self, now_ns: int) -> bool:
        return self.start_ns <= now_ns < self.end_ns


REQUEST_BODY = json.dumps(
    {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()


def request_bytes(port: int) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(REQUEST_BODY)}\r\n\r\n"
    )
    return head.encode() + REQUEST_BODY


def stamps(data: bytes, now_ns: int, load: Load) -> None:
    """Each stamped event in `data`, received at `now_ns`: counted, with its latency, in the window."""
    if not load.counts(now_ns):
        return
    at = data.find(STAMP)
    while at >= 0:
        end = data.find(b"}", at)
        load.latencies_us.append((now_ns - int(data[at + len(STAMP) : end])) / 1000)
        load.chunks += 1
        at = data.find(STAMP, end)


async def read_stream(reader: asyncio.StreamReader, load: Load) -> bool:
    """One answer: True if it was a 200 stream that ended cleanly."""
    head = await reader.readuntil(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        raise ConnectionError(f"unexpected answer: {head[:200]!r}")
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        data = await reader.readexactly(size + 2)
        stamps(data, time.monotonic_ns(), load)
    await reader.readexactly(2)
    return head.startswith(b"HTTP/1.1 200")


async def worker(port: int, load: Load) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = request_bytes(port)
    try:
        while time.monotonic_ns() < load.end_ns:
            writer.write(request)
            try:
                ok = await read_stream(reader, load)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if load.counts(time.monotonic_ns()):
                load.streams += ok
                load.errors += not ok
    finally:
        writer.close()


async def generate(port: int, concurrency: int, warmup: float, duration: float) -> Load:
    """S workers, each one stream at a time until the window ends (their last streams end after it)."""
    start = time.monotonic_ns() + int(warmup * 1e9)
    load = Load(start, start + int(duration * 1e9))
    await asyncio.gather(*(worker(port, load) for _ in range(concurrency)))
    return load


# ---- processes, CPU, profile ----------------------------------------------------------------------------


def pinned(core: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if shutil.which("taskset") else cmd


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass(frozen=True)
class RouterVariant:
    """One router to measure: LABEL=CLIENT[@SRC] (the code from SRC, its client module aliased unless
    CLIENT is "-")."""

    label: str
    client: str
    src: str | None

    @classmethod
    def parse(cls, spec: str) -> RouterVariant:
        label, _, rest = spec.partition("=")
        client, _, src = (rest or label).partition("@")
        return cls(label, client, os.path.abspath(src) if src else None)


def start_router(
    backend: int, port: int, variant: RouterVariant, profile: str | None, policy: str
) -> subprocess.Popen[bytes]:
    wrapper = [__file__, "wrapped-router", variant.client, profile or "-"]
    cmd = [sys.executable, *wrapper, "router", "--instance", f"http://127.0.0.1:{backend}"]
    cmd += ["--port", str(port), "--log-level", "warning", "--policy", policy]
    env = dict(os.environ)
    if variant.src is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (variant.src, env.get("PYTHONPATH")) if p)
    router = subprocess.Popen(pinned(0, cmd), start_new_session=True, env=env)
    wait_healthy(f"http://127.0.0.1:{port}", timeout=60)
    return router


def stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wrapped_router(client: str, out: str, argv: list[str]) -> None:
    """`pdserve router ARGS`, its upstream client module (httpx or httpx2, whichever its code imports)
    being `client`, and with `out` != "-" a cProfile from SIGUSR1 to SIGUSR2 only (steady state, no
    start-up)."""
    import cProfile
    import importlib

    if client != "-":  # "-": the router's code as it is
        module = importlib.import_module(client)
        sys.modules["httpx"] = sys.modules["httpx2"] = module  # the two share their API
    from pdserve.cli import main as pdserve_main

    if out == "-":
        pdserve_main(argv)
        return
    profiler = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

    def dump(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR2, dump)
    pdserve_main(argv)


IDLE = "<method 'poll' of 'select.epoll' objects>"


def package(filename: str) -> str:
    """Where a profiled function lives: its site-package, "pdserve", "asyncio", else "builtins/stdlib"."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "pdserve" in parts:
        return "pdserve"
    return "asyncio" if "asyncio" in parts else "builtins/stdlib"


def top_costs(profile: str, n: int = 12) -> dict[str, object]:
    """Own time by function and by package, as shares of the router's busy time (epoll waits apart), and
    the share inside httpcore's pool bookkeeping (_assign_requests_to_connections, inclusive; 0 for a
    router on aiohttp)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    idle = sum(v[2] for (_, _, name), v in stats.items() if name == IDLE)
    busy = sum(v[2] for v in stats.values()) - idle
    rows = sorted(((k, v) for k, v in stats.items() if k[2] != IDLE), key=lambda kv: kv[1][2], reverse=True)
    by_package: dict[str, float] = {}
    for (f, _, _), v in rows:
        by_package[package(f)] = by_package.get(package(f), 0.0) + v[2] / busy
    pool = sum(v[3] for (_, _, name), v in stats.items() if name == "_assign_requests_to_connections")
    return {
        "busy_s": round(busy, 2),
        "idle_in_epoll_s": round(idle, 2),
        "httpcore_pool_bookkeeping_share": round(pool / busy, 3),
        "by_package": {k: round(v, 3) for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])},
        "top_tottime": [
            {"function": f"{Path(f).name}:{line}({name})", "share": round(v[2] / busy, 3), "calls": v[1]}
            for (f, line, name), v in rows[:n]
        ],
    }


# ---- the run --------------------------------------------------------------------------------------------


def summary(load: Load, duration: float) -> dict[str, float]:
    lat = sorted(load.latencies_us) or [float("nan")]
    return {
        "streams_per_s": round(load.streams / duration, 1),
        "chunks_per_s": round(load.chunks / duration, 1),
        "chunk_latency_p50_us": round(statistics.median(lat), 1),
        "chunk_latency_p99_us": round(lat[int(0.99 * (len(lat) - 1))], 1),
        "errors": load.errors,
    }


def measure(port: int, concurrency: int, args: argparse.Namespace, pid: int | None) -> dict[str, float]:
    before, began = cpu_seconds(pid) if pid else 0.0, time.monotonic()
    load = asyncio.run(generate(port, concurrency, args.warmup, args.duration))
    row = summary(load, args.duration)
    if pid:
        cpu = (cpu_seconds(pid) - before) / (time.monotonic() - began)
        row["router_cpu"] = round(cpu, 2)  # cores the router kept busy
        row["chunks_per_router_cpu_s"] = round(row["chunks_per_s"] / max(cpu, 1e-9))
    return row


def run(args: argparse.Namespace) -> dict[str, object]:
    if hasattr(os, "sched_setaffinity") and shutil.which("taskset"):
        os.sched_setaffinity(0, {1})  # the load generator shares core 1 with the backend
    backend_port, router_port = free_port(), free_port()
    backend_cmd = [sys.executable, __file__, "backend", "--port", str(backend_port)]
    backend_cmd += ["--chunks", str(args.chunks), "--interval-ms", str(args.interval_ms)]
    backend = subprocess.Popen(pinned(1, backend_cmd), start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{backend_port}", timeout=60)
        rows = {s: {"concurrency": s, "direct": measure(backend_port, s, args, None)} for s in args.levels}
        for variant in args.routers:
            router = start_router(backend_port, router_port, variant, None, args.policy)
            try:
                for s, row in rows.items():
                    row[f"router_{variant.label}"] = measure(router_port, s, args, router.pid)
                    print(json.dumps(row), flush=True)
            finally:
                stop(router)
        profile = {
            v.label: profile_router(backend_port, free_port(), v, args)
            for v in (args.routers if args.profile_level else ())  # 0: no cProfile runs
        }
    finally:
        stop(backend)
    return {"rows": list(rows.values()), "profile": profile}


def profile_router(
    backend_port: int, port: int, variant: RouterVariant, args: argparse.Namespace
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "router.prof")
        router = start_router(backend_port, port, variant, path, args.policy)
        try:
            os.kill(router.pid, signal.SIGUSR1)
            row = measure(port, args.profile_level, args, router.pid)
            os.kill(router.pid, signal.SIGUSR2)
            for _ in range(100):
                if os.path.exists(path):
                    break
                time.sleep(0.1)
        finally:
            stop(router)
        return {"concurrency": args.profile_level, "under_cprofile": row, **top_costs(path)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "backend"])
    p.add_argument("--port", type=int, default=0, help="backend mode: its port")
    p.add_argument("--chunks", type=int, default=64, help="events per stream")
    p.add_argument("--interval-ms", type=float, default=10.0, help="backend's time between two events")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 128, 256])
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per run not counted")
    p.add_argument("--duration", type=float, default=4.0, help="seconds counted per run")
    p.add_argument(
        "--routers",
        type=lambda s: [RouterVariant.parse(x) for x in s.split(",")],
        default=[RouterVariant.parse("router=-")],
        help="LABEL=CLIENT[@SRC],...: one router run each, its code from SRC (default: this tree), its "
        "httpx/httpx2 module aliased to CLIENT (httpx or httpx2; '-': as it is)",
    )
    p.add_argument("--policy", default="round_robin", help="the router's --policy")
    p.add_argument("--profile-level", type=int, default=128, help="concurrency of the cProfile run (0: none)")
    p.add_argument("--out", default=None, help="results JSON (default docs/bench/cpu/router-relay-DATE.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wrapped-router"]:  # wrapped-router CLIENT PROFILE|- router ARGS...
        wrapped_router(argv[1], argv[2], argv[3:])
        return
    args = parse_args(argv)
    if args.mode == "backend":
        with contextlib.suppress(KeyboardInterrupt):  # stopped by SIGINT
            asyncio.run(run_backend(args.port, args.chunks, args.interval_ms / 1000))
        return
    results = run(args)
    date = datetime.date.today().isoformat()
    out = Path(args.out or f"docs/bench/cpu/router-relay-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": date,
        "machine": machine(),
        "command": " ".join(["benchmarks/router_relay.py", *sys.argv[1:]]),
    }
    keys = ("chunks", "interval_ms", "levels", "warmup", "duration", "policy")
    config: dict[str, object] = {k: getattr(args, k) for k in keys}
    config["routers"] = [f"{v.label}={v.client}@{v.src or '.'}" for v in args.routers]
    out.write_text(json.dumps({**meta, "config": config, **results}, indent=2) + "\n")
    print(f"wrote {out}")


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}"


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: starting server processes, waiting for their /health and stopping
them; and timing a callable (CUDA events on a GPU, the wall clock on the CPU; or replays of a CUDA graph).

Scripts in this folder import it as `from common import ...` (benchmarks/ is sys.path[0] when one runs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

# ---- server processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`cmd` in a process group of its own (stop() ends it with its children), output appended to `log`
    (this terminal without one)."""
    if log is None:
        return subprocess.Popen(cmd, env=env, start_new_session=True)
    with log.open("ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM each process group (the last started first), SIGKILL those still there after `timeout`."""
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_healthy(url: str, procs: Sequence[subprocess.Popen[bytes]] = (), timeout: float = 600) -> None:
    """Until GET url/health answers 200; RuntimeError as soon as one of `procs` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = [p for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"{exited[0].args} exited ({exited[0].returncode}) before {url} was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


# ---- timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `iters` runs (CUDA events on a GPU, the wall clock on the CPU)."""
    import torch  # here: the scripts that only start servers need no torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_time(fn: Callable[[int], Any], launches: int = 20, replays: int = 20, warmup: int = 1) -> float:
    """Seconds per launch of fn(i), i = 0..launches-1 captured in one CUDA graph (median of replays)."""
    import torch

    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    return timed(graph.replay, replays, warmup) / launches

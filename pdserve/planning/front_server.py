"""`pdserve profile --front`: a real `pdserve serve` of the profiled model, started after the engine's
own measurements (the engine's memory is free again), for front_probe's HTTP measurement; stopped
however that ends. The server gets the options the profiled engine had, so its steps cost the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import httpx

from pdserve.ports import free_port

SERVE_OPTIONS = (  # profile's argument -> serve's flag
    ("model", "--model"),
    ("load_format", "--load-format"),
    ("tokenizer", "--tokenizer"),
    ("device", "--device"),
    ("tp", "--tp"),
    ("dtype", "--dtype"),
    ("max_num_seqs", "--max-num-seqs"),
    ("max_num_batched_tokens", "--max-num-batched-tokens"),
    ("num_blocks", "--num-blocks"),
    ("gpu_memory_utilization", "--gpu-memory-utilization"),
)


def serve_command(options: dict[str, object], port: int) -> list[str]:
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), "--log-level", "warning"]
    for name, flag in SERVE_OPTIONS:
        value = options.get(name)
        if value is not None:
            cmd += [flag, str(value).split(":")[0] if name == "device" else str(value)]
    return cmd


@contextmanager
def running_server(options: dict[str, object], timeout: float = 900.0) -> Iterator[str]:
    """A `pdserve serve` with these options on a free port: its base URL until the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            serve_command(options, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_healthy(url, proc, log, timeout)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"the front's server exited ({proc.returncode}) before it was up:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the front's server at {url} was not healthy within {timeout:g} s")

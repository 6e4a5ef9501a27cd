"""TTFT and TPOT of 1 prefill + 1 decode vs one colocated instance, at 1 and 16 concurrent requests.

Starts each cluster with `pdserve up` (router in front in both cases, so the paths compare), sends
random token prompts to /v1/completions with streaming, EOS ignored, and measures per request:
TTFT (send -> first token) and TPOT ((last token - first token) / (tokens - 1)).

    .venv/bin/python benchmarks/disagg_latency.py [--input-len 256] [--output-len 64] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import httpx
from common import free_port  # benchmarks/ is sys.path[0]


def start_cluster(layout: list[str], port: int, num_blocks: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "up",
        *layout,
        "--port",
        str(port),
        "--num-blocks",
        str(num_blocks),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if "pdserve is up" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("cluster did not start")


async def one_request(
    client: httpx.AsyncClient, url: str, prompt: list[int], out_len: int
) -> tuple[float, float]:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "prompt": prompt,
        "max_tokens": out_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / max(1, len(times) - 1)
    return ttft, tpot


async def run_load(
    base: str, prompts: list[list[int]], out_len: int, concurrency: int
) -> list[tuple[float, float]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        await one_request(client, f"{base}/v1/completions", prompts[0][:16], 4)  # warm-up

        async def bounded(p: list[int]) -> tuple[float, float]:
            async with sem:
                return await one_request(client, f"{base}/v1/completions", p, out_len)

        return await asyncio.gather(*(bounded(p) for p in prompts))


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
    return f"{statistics.mean(xs) * 1e3:.0f} / {statistics.median(xs) * 1e3:.0f} / {p99 * 1e3:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=1024)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.input_len)] for _ in range(args.requests)]
    rows = []
    for name, layout in (
        ("colocated (1 instance)", ["--instances", "1"]),
        ("1P1D", ["--prefill", "1", "--decode", "1"]),
    ):
        port = free_port()
        proc = start_cluster(layout, port, args.num_blocks)
        try:
            for conc in (1, 16):
                n = args.requests if conc > 1 else min(8, args.requests)
                res = asyncio.run(run_load(f"http://127.0.0.1:{port}", prompts[:n], args.output_len, conc))
                rows.append((name, conc, summary([r[0] for r in res]), summary([r[1] for r in res])))
                print(rows[-1], flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    print(f"\ninput {args.input_len} tokens, output {args.output_len} tokens (EOS ignored), greedy\n")
    print(
        "| layout | concurrency | TTFT ms mean / p50 / p99 | TPOT ms mean / p50 / p99 |\n|---|---:|---|---|"
    )
    for name, conc, ttft, tpot in rows:
        print(f"| {name} | {conc} | {ttft} | {tpot} |")


if __name__ == "__main__":
    main()

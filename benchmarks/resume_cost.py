"""What a resume costs a client: 1 prefill + 2 decode instances and a router; S concurrent greedy streams;
once every stream has its first K tokens, one decode instance is SIGKILLed and the router resumes its
streams on the other (a prefill instance recomputes prompt + the tokens already sent, the KV moves).

    .venv/bin/python benchmarks/resume_cost.py [--streams 8] [--max-tokens 64] [--kill-after 16]
        [--output FILE] [-- SERVE OPTIONS...]    e.g. -- --device cuda --model qwen2.5-7b --load-format dummy

Reported for a fault-free pass and the faulted pass of the same requests:
    ttft         request start to the first chunk
    tpot         the median wait between chunks
    gap          the longest wait between two chunks
    e2e          request start to [DONE]
and, for the resumed streams only (the router's log names each resumed request by its completion id):
    resume_delay the kill to the stream's next chunk: what the client waits for the resumed part's
                 first token (failure detection, prompt + sent tokens recomputed, the KV moved)
The router's pdserve_router_resumes_total says how many it resumed. Outputs must equal the fault-free
pass. On CPU every engine gets one OpenMP thread (OMP_NUM_THREADS=1 unless set), as they share cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import free_port, start, wait_healthy  # benchmarks/ is sys.path[0]
from common import stop as stop_all

from pdserve.router.metrics import metric_sum

ROOT = Path(__file__).resolve().parent.parent
PY = [sys.executable, "-m", "pdserve.cli"]
PROMPT = "Write a long story about a lighthouse keeper and the sea, chapter {i}:"


class Cluster:
    """1 prefill + 2 decode instances and a router, on this machine."""

    def __init__(self, log_dir: Path, serve: list[str]) -> None:
        self.log_dir = log_dir
        secret = log_dir / "secret"
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
        self.env = {"OMP_NUM_THREADS": "1", **os.environ, "PDSERVE_CLUSTER_SECRET": secret.read_text()}
        self.ports = {name: free_port() for name in ("prefill", "decode0", "decode1", "router")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.serve = serve
        self.model = ""
        self.killed_at = 0.0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self) -> None:
        for name in ("prefill", "decode0", "decode1"):
            role = "prefill" if name == "prefill" else "decode"
            args = ["serve", "--role", role, "--port", str(self.ports[name]), *self.serve]
            self.procs[name] = start([*PY, *args], self.log_dir / f"{name}.log", self.env)
        for name in ("prefill", "decode0", "decode1"):
            wait_healthy(self.url(name), [self.procs[name]])
        router = ["router", "--port", str(self.ports["router"]), "--health-interval", "0.5"]
        router += ["--prefill", self.url("prefill"), "--decode", self.url("decode0"), self.url("decode1")]
        self.procs["router"] = start([*PY, *router], self.log_dir / "router.log", self.env)
        wait_healthy(self.url("router"), [self.procs["router"]], timeout=60)
        self.model = httpx.get(f"{self.url('decode1')}/v1/models", timeout=10).json()["data"][0]["id"]

    def kill_decode0(self) -> None:
        self.killed_at = time.perf_counter()
        self.procs["decode0"].kill()

    def resumed_ids(self) -> set[str]:
        """The completion ids of the requests the router resumed (its log line for each)."""
        text = (self.log_dir / "router.log").read_text(errors="replace")
        return set(re.findall(r"request (\S+): .* resumed on ", text))

    def stop(self) -> None:
        stop_all(list(self.procs.values()))

    def resumes(self) -> float:
        text = httpx.get(f"{self.url('router')}/metrics", timeout=10).text
        return metric_sum(text, "pdserve_router_resumes_total", outcome="resumed")


async def one_stream(
    client: httpx.AsyncClient, cluster: Cluster, i: int, max_tokens: int, seen: list[int]
) -> dict:
    body = {
        "model": cluster.model,
        "prompt": PROMPT.format(i=i),
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    body.update(stream=True, ignore_eos=True)
    start = time.perf_counter()
    times: list[float] = []
    text, completion_id = "", ""
    async with client.stream("POST", f"{cluster.url('router')}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"error": data["error"], "text": text}
            completion_id = data.get("id", completion_id)
            piece = data["choices"][0]["text"] if data.get("choices") else ""
            if piece:
                times.append(time.perf_counter())
                text += piece
                seen[i] += 1
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "id": completion_id,
        "text": text,
        "times": times,
        "ttft": times[0] - start if times else None,
        "gap": max(gaps, default=0.0),
        "tpot": statistics.median(gaps) if gaps else 0.0,
        "e2e": time.perf_counter() - start,
    }


async def run_pass(cluster: Cluster, streams: int, max_tokens: int, kill_after: int | None) -> list[dict]:
    seen = [0] * streams
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [
            asyncio.ensure_future(one_stream(client, cluster, i, max_tokens, seen)) for i in range(streams)
        ]
        if kill_after is not None:
            while min(seen) < kill_after and not all(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            cluster.kill_decode0()
        return list(await asyncio.gather(*tasks))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summary(results: list[dict]) -> dict[str, float]:
    ok = [r for r in results if "error" not in r]
    return {
        "streams": len(results),
        "failed": len(results) - len(ok),
        "ttft_median_s": median([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_median_s": median([r["tpot"] for r in ok]),
        "gap_median_s": median([r["gap"] for r in ok]),
        "gap_max_s": max((r["gap"] for r in ok), default=0.0),
        "e2e_median_s": median([r["e2e"] for r in ok]),
        "e2e_max_s": max((r["e2e"] for r in ok), default=0.0),
    }


def resume_delays(results: list[dict], resumed: set[str], killed_at: float) -> dict[str, float]:
    """For the resumed streams: the kill to their next chunk, and their own median chunk gap."""
    delays, tpots = [], []
    for r in results:
        after = [t for t in r.get("times", []) if t > killed_at]
        if r.get("id") in resumed and after:
            delays.append(after[0] - killed_at)
            tpots.append(r["tpot"])
    return {
        "resumed_streams": len(delays),
        "resume_delay_median_s": median(delays),
        "resume_delay_max_s": max(delays, default=0.0),
        "their_tpot_median_s": median(tpots),
    }


def main() -> None:
    argv = sys.argv[1:]
    serve = argv[argv.index("--") + 1 :] if "--" in argv else ["--device", "cpu", "--num-blocks", "512"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8, help="concurrent streams")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens of each answer")
    p.add_argument("--kill-after", type=int, default=16, help="chunks every stream has before the kill")
    p.add_argument("--output", default=None, help="write the result JSON here")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="resume-cost-")), serve)
    try:
        cluster.start()
        clean = asyncio.run(run_pass(cluster, args.streams, args.max_tokens, None))
        faulted = asyncio.run(run_pass(cluster, args.streams, args.max_tokens, args.kill_after))
        resumed = cluster.resumes()
        delays = resume_delays(faulted, cluster.resumed_ids(), cluster.killed_at)
    finally:
        cluster.stop()
    equal = sum(a.get("text") == b.get("text") for a, b in zip(clean, faulted, strict=True))
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "serve": serve,
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "kill_after": args.kill_after,
        "fault_free": summary(clean),
        "faulted": summary(faulted),
        "router_resumes_total": resumed,
        "resumed": delays,
        "outputs_equal": equal,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

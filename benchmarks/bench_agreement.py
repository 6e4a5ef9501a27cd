"""Agreement of `pdserve bench serve` with guidellm and aiperf: one server, one workload, three tools.

Starts `pdserve serve` (or uses --base-url; or, as a control, guidellm's mock server, whose timing
does not depend on the CPU), then runs each tool on the same workload: random prompts of exactly
--input-len tokens, exactly --output-len output tokens (ignore_eos; aiperf also gets min_tokens),
streamed /v1/completions, at one request rate (constant or Poisson arrivals) or one concurrency.
Rounds run the tools one after another, the order rotated each round, or (--together) all three at
once, so that whatever else the machine runs slows the server alike for all three. Every run has new
prompts (its own seed, and --prefix-salt auto for ours): no run is answered from another's prefix cache.

Each row of the table is one definition; the pdserve bench column is our measurement under that
definition (pdserve/bench/definitions.py), the tools' columns are their own reports, and the deltas
are (tool - ours) / ours.

    python3 benchmarks/bench_agreement.py --guidellm-venv /tmp/gl --aiperf-venv /tmp/ap \\
        [--rate 0.5 [--arrival poisson] | --concurrency 4] [--num-prompts 20] [--rounds 2] \\
        [--together] [--mock-server "--ttft-ms 300 --itl-ms 50"] --out agreement.json

guidellm and aiperf each live in their own virtualenv (`python3 -m venv /tmp/gl && /tmp/gl/bin/pip
install guidellm`; aiperf likewise); they are not pdserve dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import free_port  # benchmarks/ is sys.path[0]

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("pdserve", "guidellm", "aiperf")
Metrics = dict[str, float]

# (key, what it measures, which tools report it under that definition)
ROWS = (
    ("ttft", "TTFT, ms: first text chunk - send (all three)"),
    ("decode", "decode time per token, ms: (last chunk - first chunk) / (n - 1) (guidellm, aiperf ITL)"),
    ("tpot_vllm", "TPOT, ms: ([DONE] - send - TTFT) / (n - 1) (pdserve bench and vLLM TPOT)"),
    ("per_token_all", "time per token incl. the first, ms: (last chunk - send) / n (guidellm TPOT)"),
    ("chunk_gap", "gap between text chunks, ms, pooled (pdserve bench ITL, aiperf inter_chunk_latency)"),
    ("latency_done", "request latency, ms: [DONE] - send (pdserve bench E2EL, guidellm)"),
    ("latency_last", "request latency, ms: last text chunk - send (aiperf)"),
    ("output_tps", "output tokens/s over the run (all three)"),
    ("request_tps", "completed requests/s over the run (all three)"),
)


@contextlib.contextmanager
def pdserve_server(args: argparse.Namespace) -> Iterator[str]:
    """The base URL of a ready server: --base-url as given, else one we start and stop: `pdserve serve`,
    or (--mock-server) guidellm's mock server."""
    if args.base_url:
        yield args.base_url.rstrip("/").removesuffix("/v1")
        return
    port = free_port()
    cmd = [*pinned(args.server_cpus), sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port)]
    cmd += ["--model", args.model_path, "--served-model-name", args.model_name]
    cmd += shlex.split(args.server_args)
    if args.mock_server:
        cmd = [str(Path(args.guidellm_venv) / "bin" / "guidellm"), "mock-server", "--port", str(port)]
        cmd += ["--model", args.model_name, *shlex.split(args.mock_server)]
    log = open(Path(args.work_dir) / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=tool_env(cmd)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pdserve serve exited with {proc.returncode}: see server.log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise SystemExit(f"pdserve serve not ready after {timeout:g} s")


def warm_up(url: str, model: str, n: int = 3) -> None:
    """A few requests first, so no tool's first requests pay for a cold server."""
    for i in range(n):
        body = {"model": model, "prompt": f"warm up {i}", "max_tokens": 8, "stream": False}
        httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()


def pinned(cpus: str | None) -> list[str]:
    """A `taskset` prefix: on a small shared machine the server and the tools get separate cores, so
    a tool's own CPU use (guidellm and aiperf run several processes) cannot slow the server it times."""
    return ["taskset", "-c", cpus] if cpus else []


def tool_env(cmd: list[str]) -> dict[str, str]:
    """Our environment; for guidellm and aiperf (their own virtualenvs) without PYTHONPATH, which
    points at pdserve's tree and must not shadow their packages."""
    if sys.executable in cmd:
        return dict(os.environ)
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(cmd: list[str], log: Path, args: argparse.Namespace) -> None:
    with log.open("w") as f:
        done = subprocess.run(
            [*pinned(args.client_cpus), *cmd],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=args.tool_timeout,
            cwd=ROOT,
            env=tool_env(cmd),
        )
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (rc {done.returncode}); its output: {log}")


def run_pdserve(args: argparse.Namespace, url: str, seed: int, out: Path) -> Metrics:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "serve", "--base-url", url]
    cmd += ["--model", args.model_name, "--tokenizer", args.model_path, "--endpoint", "completions"]
    cmd += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos"]
    cmd += ["--num-prompts", str(args.num_prompts), "--seed", str(seed), "--prefix-salt", "auto"]
    cmd += ["--history", "", "--disable-tqdm", "--output", str(out / "pdserve.json")]
    if args.concurrency:
        cmd += ["--max-concurrency", str(args.concurrency)]
    else:
        cmd += ["--request-rate", str(args.rate), "--arrival", args.arrival]
    run(cmd, out / "pdserve.log", args)
    r = json.loads((out / "pdserve.json").read_text())
    g, a = r["equivalents"]["guidellm"], r["equivalents"]["aiperf"]
    return {
        "ttft": r["mean_ttft_ms"],
        "decode": a["inter_token_latency"],
        "tpot_vllm": r["mean_tpot_ms"],
        "per_token_all": g["time_per_output_token_ms"],
        "chunk_gap": r["mean_itl_ms"],
        "latency_done": r["mean_e2el_ms"],
        "latency_last": a["request_latency"],
        "output_tps": r["output_throughput"],
        "request_tps": r["request_throughput"],
        "completed": r["completed"],
        "cached_tokens": r["total_cached_input_tokens"] or 0,
    }


def run_guidellm(args: argparse.Namespace, url: str, seed: int, out: Path) -> Metrics:
    backend = f"kind=openai_http,target={url},model={args.model_name},request_format=/v1/completions"
    # guidellm 0.8.1's poisson profile sends every request at once (docs/benchmarks.md): constant
    # arrivals at the same rate stand in for it
    profile = (
        f"kind=concurrent,streams={args.concurrency}"
        if args.concurrency
        else f"kind=constant,rate={args.rate}"
    )
    data = f"kind=synthetic_text,prompt_tokens={args.input_len},output_tokens={args.output_len}"
    cmd = [str(Path(args.guidellm_venv) / "bin" / "guidellm"), "run", "--backend", backend]
    cmd += ["--tokenizer", f"kind=huggingface_auto,model={args.model_path}", "--profile", profile]
    cmd += ["--constraint", f"kind=max_requests,count={args.num_prompts}", "--data", data]
    cmd += ["--seed", f"kind=static,value={seed}", "--disable-progress"]
    cmd += ["--output", f"kind=json,path={out / 'guidellm.json'}"]
    run(cmd, out / "guidellm.log", args)
    bench = json.loads((out / "guidellm.json").read_text())["benchmarks"][0]
    m = bench["metrics"]

    def mean(key: str) -> float:
        return float(m[key]["successful"]["mean"])

    done = bench["requests"]["successful"]
    return {
        "ttft": mean("time_to_first_token_ms"),
        "decode": mean("inter_token_latency_ms"),
        "per_token_all": mean("time_per_output_token_ms"),
        "latency_done": mean("request_latency") * 1000.0,
        "output_tps": mean("output_tokens_per_second"),
        "request_tps": mean("requests_per_second"),
        "completed": len(done),
        "cached_tokens": sum(r.get("cached_tokens") or 0 for r in done),
    }


def run_aiperf(args: argparse.Namespace, url: str, seed: int, out: Path) -> Metrics:
    cmd = [str(Path(args.aiperf_venv) / "bin" / "aiperf"), "profile", "--model", args.model_name]
    cmd += ["--url", url, "--endpoint-type", "completions", "--streaming", "--tokenizer", args.model_path]
    cmd += ["--isl", str(args.input_len), "--synthetic-input-tokens-stddev", "0"]
    cmd += ["--osl", str(args.output_len), "--output-tokens-stddev", "0"]
    cmd += ["--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.output_len}"]
    cmd += ["--use-legacy-max-tokens", "--use-server-token-count", "--request-count", str(args.num_prompts)]
    cmd += ["--random-seed", str(seed), "--workers-max", "1", "--record-processors", "1", "--ui", "none"]
    cmd += ["--artifact-dir", str(out / "aiperf")]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    else:
        cmd += ["--request-rate", str(args.rate), "--arrival-pattern", args.arrival]
    run(cmd, out / "aiperf.log", args)
    r = json.loads((out / "aiperf" / "profile_export_aiperf.json").read_text())

    def avg(key: str) -> float:
        return float(r[key]["avg"])

    return {
        "ttft": avg("time_to_first_token"),
        "decode": avg("inter_token_latency"),
        "chunk_gap": avg("inter_chunk_latency"),
        "latency_last": avg("request_latency"),
        "output_tps": avg("output_token_throughput"),
        "request_tps": avg("request_throughput"),
        "completed": avg("request_count"),
        "cached_tokens": avg("usage_prompt_cache_read_tokens")
        if "usage_prompt_cache_read_tokens" in r
        else 0,
    }


RUNNERS: dict[str, Callable[[argparse.Namespace, str, int, Path], Metrics]] = {
    "pdserve": run_pdserve,
    "guidellm": run_guidellm,
    "aiperf": run_aiperf,
}


def run_tool(args: argparse.Namespace, url: str, tool: str, k: int, seed: int) -> Metrics:
    out = Path(args.work_dir) / f"round{k}" / tool
    out.mkdir(parents=True, exist_ok=True)
    if args.together:
        time.sleep(args.delays.get(tool, 0.0))
    started = time.monotonic()
    metrics = RUNNERS[tool](args, url, seed, out)
    print(f"round {k} {tool}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return metrics


def run_rounds(args: argparse.Namespace, url: str) -> dict[str, list[Metrics]]:
    """Every tool once per round, a fresh seed for every run: one after another, the order rotated each
    round, or (--together) all three at once, each offering the whole workload, so that whatever else
    the machine runs slows the server alike for all three."""
    runs: dict[str, list[Metrics]] = {tool: [] for tool in TOOLS}
    for k in range(args.rounds):
        order = TOOLS[k % 3 :] + TOOLS[: k % 3]
        seeds = {tool: 100 * (k + 1) + i for i, tool in enumerate(order)}
        if args.together:
            with ThreadPoolExecutor(len(TOOLS)) as pool:
                futures = {t: pool.submit(run_tool, args, url, t, k, seeds[t]) for t in order}
                for tool, future in futures.items():
                    runs[tool].append(future.result())
        else:
            for tool in order:
                runs[tool].append(run_tool(args, url, tool, k, seeds[tool]))
    return runs


def averaged(runs: dict[str, list[Metrics]]) -> dict[str, Metrics]:
    return {
        tool: {key: statistics.fmean(r[key] for r in rs) for key in rs[0]} for tool, rs in runs.items() if rs
    }


def delta(tool: float | None, ours: float | None) -> str:
    if tool is None or ours is None or ours == 0:
        return ""
    return f"{100.0 * (tool - ours) / ours:+.1f}%"


def table(means: dict[str, Metrics]) -> str:
    """The markdown table: one row per definition, each tool's value and its difference from ours."""
    rows = ["| metric (definition) | pdserve bench | guidellm | diff | aiperf | diff |"]
    rows.append("|---|---:|---:|---:|---:|---:|")
    for key, label in ROWS:
        ours, gl, ap = (means[t].get(key) for t in TOOLS)
        cells = [f"{v:.2f}" if v is not None else "-" for v in (ours, gl, ap)]
        rows.append(
            f"| {label} | {cells[0]} | {cells[1]} | {delta(gl, ours)} | {cells[2]} | {delta(ap, ours)} |"
        )
    return "\n".join(rows)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return (done.stdout.strip().splitlines() or ["?"])[-1]
    return "?"


def parse_args() -> argparse.Namespace:
    from pdserve.models.prepare import DEFAULT_MODEL_NAME, resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guidellm-venv", default="/tmp/gl", help="virtualenv with guidellm installed")
    p.add_argument("--aiperf-venv", default="/tmp/ap", help="virtualenv with aiperf installed")
    p.add_argument("--base-url", default=None, help="use this server instead of starting one")
    p.add_argument("--model-path", default=None, help="model dir (default: pdserve's default model)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the served model name")
    p.add_argument("--server-args", default="--device cpu", help="more `pdserve serve` arguments")
    p.add_argument(
        "--mock-server",
        default=None,
        help="a control: guidellm's mock server with these timing arguments (e.g. '--ttft-ms 300 "
        "--itl-ms 50') instead of pdserve, so that only the definitions differ, not the server's speed",
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=20, help="requests per run")
    p.add_argument("--rate", type=float, default=0.5, help="request rate, req/s")
    p.add_argument("--arrival", choices=["constant", "poisson"], default="constant", help="at --rate")
    p.add_argument("--concurrency", type=int, default=None, help="a concurrency instead of a rate")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tool, order rotated")
    p.add_argument("--together", action="store_true", help="run the three tools at once in each round")
    p.add_argument(
        "--delays",
        default="",
        help="with --together, seconds each tool starts late, so that their first requests (after their "
        "different start-up times) go out together",
    )
    p.add_argument("--tool-timeout", type=float, default=900.0, help="seconds per tool run")
    p.add_argument("--server-cpus", default=None, help="taskset CPU list for the server, e.g. 0")
    p.add_argument("--client-cpus", default=None, help="taskset CPU list for every tool, e.g. 1")
    p.add_argument("--work-dir", default="bench-agreement", help="logs and each tool's own output")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args()
    args.model_path = args.model_path or resolve_model(None)
    args.delays = {k: float(v) for k, _, v in (d.partition("=") for d in args.delays.split(",") if d)}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    return args


def main() -> int:
    args = parse_args()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with pdserve_server(args) as url:
        warm_up(url, args.model_name)
        runs = run_rounds(args, url)
    means = averaged(runs)
    load = f"concurrency {args.concurrency}" if args.concurrency else f"{args.arrival} {args.rate:g} req/s"
    workload = f"{args.input_len} in / {args.output_len} out tokens, {load}, {args.num_prompts} requests"
    workload += ", the three tools at once" if args.together else ", one tool at a time"
    if args.arrival == "poisson" and not args.concurrency:
        workload += " (guidellm: constant arrivals)"
    result = {
        "date": started,
        "machine": machine(),
        "workload": workload,
        "rounds": args.rounds,
        "versions": {
            "guidellm": version([str(Path(args.guidellm_venv) / "bin" / "guidellm"), "--version"]),
            "aiperf": version([str(Path(args.aiperf_venv) / "bin" / "aiperf"), "--version"]),
        },
        "runs": runs,
        "means": means,
        "table": table(means),
    }
    print(f"{result['workload']}; {args.rounds} rounds; {result['machine']}\n{result['table']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine on a thread of the HTTP server vs in its own process (`--engine-process`): an A/B.

For each round, each mode in turn (thread, process, thread, process, ...): start one `pdserve serve`,
warm it up (a short run), run `pdserve bench serve` at every --streams level (closed loop: N streams,
N prompts, fresh prompts each run so no prefix cache answers them, --ignore-eos), stop it. Prints
output tok/s, mean TPOT and the run's duration per mode and level (the median over rounds, and every
run), writes them to --out.

    GPU (one card, 7B dummy weights, issue 30's shape; about 7 min, from the repository root):
        source scripts/device_env.sh && python3 benchmarks/front_ab.py --out $OUT/front_ab.json
    CPU (the default model):
        .venv/bin/python benchmarks/front_ab.py --device cpu --model '' --tokenizer '' --max-num-seqs 64 \
            --streams 64 --input-len 128 --output-len 64 --out /tmp/front_ab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from common import free_port, start, stop, wait_healthy  # benchmarks/ is sys.path[0]

from pdserve.router.metrics import metric_sum

MODES = {"thread": "--no-engine-process", "process": "--engine-process"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-7b", help="'' : the default model")
    ap.add_argument("--load-format", default="dummy", help="'' : the server's default")
    ap.add_argument("--tokenizer", default=".whl/tokenizer", help="'' : the model's")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--streams", default="64,256", help="concurrency levels, comma-separated")
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0, help="as gpu_session.sh's front phase")
    ap.add_argument("--rounds", type=int, default=2, help="servers started per mode")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more `serve` argument")
    ap.add_argument("--router-streams", default="", help="levels run again through `pdserve router`")
    ap.add_argument("--modes", default=",".join(MODES), help="engine placements, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("front_ab.json"))
    return ap.parse_args()


def serve_command(args: argparse.Namespace, port: int, mode: str) -> list[str]:
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port), "--device", args.device]
    for flag, value in (("--model", args.model), ("--load-format", args.load_format)):
        cmd += [flag, value] if value else []
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    return cmd + ["--max-num-seqs", str(args.max_num_seqs), MODES[mode], *args.serve_arg]


def bench(args: argparse.Namespace, url: str, streams: int, label: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "serve", "--base-url", url]
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    cmd += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos"]
    cmd += ["--num-prompts", str(streams), "--max-concurrency", str(streams), "--prefix-salt", "auto"]
    cmd += ["--temperature", str(args.temperature), "--history", "", "--disable-tqdm"]
    cmd += ["--label", label, "--output", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    keys = ("output_throughput", "mean_tpot_ms", "duration", "completed")
    return {k: result.get(k) for k in keys}


Runs = list[dict[str, Any]]


def one_server(args: argparse.Namespace, mode: str, levels: list[int], work: Path, i: int) -> Runs:
    """Start a server in `mode`, run every level against it, stop it."""
    port = free_port()
    log = work / f"serve_{mode}_{i}.log"
    proc = start(serve_command(args, port, mode), log)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", [proc])
        except (RuntimeError, TimeoutError):
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        warm = argparse.Namespace(**{**vars(args), "output_len": 8})  # first requests pay for lazy setup
        bench(warm, f"http://127.0.0.1:{port}", min(levels), "warmup", work / "warmup.json")
        url = f"http://127.0.0.1:{port}"
        runs = run_levels(args, url, mode, levels, work, i, url)
        if args.router_streams:
            runs += through_router(args, port, mode, work, i)
        return runs
    finally:
        stop([proc])


def engine_clock(url: str) -> dict[str, float]:
    """The engine's device busy and host wait totals (engine/step_clock.py) from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    names = {
        "busy_s": "pdserve_engine_device_busy_seconds",
        "wait_s": "pdserve_engine_host_wait_seconds",
        "front_s": "pdserve_request_front_seconds_sum",  # arrival -> prompt in the engine, summed
        "fronts": "pdserve_request_front_seconds_count",
    }
    return {key: metric_sum(text, name) for key, name in names.items()}


def run_levels(
    args: argparse.Namespace, url: str, mode: str, levels: list[int], work: Path, i: int, engine_url: str
) -> Runs:
    """Each level against `url`; the engine's clock read from `engine_url` around each run, so a run's
    duration can be set against the device time its steps took."""
    runs = []
    for streams in levels:
        label = f"{mode}_{streams}_{i}"
        before = engine_clock(engine_url)
        row = bench(args, url, streams, label, work / f"{label}.json")
        after = engine_clock(engine_url)
        row |= {key: after[key] - before[key] for key in after}
        row["overhead"] = row["duration"] / row["busy_s"] - 1 if row["busy_s"] else None
        row["front_mean_s"] = row["front_s"] / row["fronts"] if row["fronts"] else None
        runs.append({"mode": mode, "streams": streams, "round": i, **row})
        print(
            f"{label:>20}: {row['output_throughput']:.0f} tok/s, TPOT {row['mean_tpot_ms']:.1f} ms, "
            f"{row['duration']:.2f} s, device busy {row['busy_s']:.2f} s, host waited {row['wait_s']:.2f} s, "
            f"mean front {row['front_s'] / max(row['fronts'], 1) * 1000:.0f} ms",
            flush=True,
        )
    return runs


def through_router(args: argparse.Namespace, port: int, mode: str, work: Path, i: int) -> Runs:
    """The --router-streams levels again, through a `pdserve router` in front of the server."""
    rport = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(rport)]
    router = start([*cmd, "--instance", f"http://127.0.0.1:{port}"], work / f"router_{mode}_{i}.log")
    try:
        wait_healthy(f"http://127.0.0.1:{rport}", [router])
        levels = [int(s) for s in args.router_streams.split(",")]
        url = f"http://127.0.0.1:{rport}"
        return run_levels(args, url, f"{mode}+router", levels, work, i, f"http://127.0.0.1:{port}")
    finally:
        stop([router])


def summary(runs: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for streams in levels:
        for mode in sorted({r["mode"] for r in runs}):
            mine = [r for r in runs if r["mode"] == mode and r["streams"] == streams]
            if not mine:
                continue
            rows.append(
                {
                    "streams": streams,
                    "mode": mode,
                    "output_tok_s": statistics.median(r["output_throughput"] for r in mine),
                    "mean_tpot_ms": statistics.median(r["mean_tpot_ms"] for r in mine),
                    "duration_s": statistics.median(r["duration"] for r in mine),
                    "device_busy_s": statistics.median(r["busy_s"] for r in mine),
                    "host_wait_s": statistics.median(r["wait_s"] for r in mine),
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="front_ab_") as tmp:
        for i in range(args.rounds):
            for mode in args.modes.split(","):
                runs += one_server(args, mode, levels, Path(tmp), i)
    rows = summary(runs, sorted({r["streams"] for r in runs}))
    head = f"{'streams':>7} {'mode':>14} {'output tok/s':>13} {'mean TPOT ms':>13} {'duration s':>11}"
    print(f"\n{head} {'device busy s':>14} {'over busy':>10}")
    for r in rows:
        over = r["duration_s"] / r["device_busy_s"] - 1 if r["device_busy_s"] else float("nan")
        print(
            f"{r['streams']:>7} {r['mode']:>14} {r['output_tok_s']:>13.0f} {r['mean_tpot_ms']:>13.2f} "
            f"{r['duration_s']:>11.2f} {r['device_busy_s']:>14.2f} {over:>+10.1%}"
        )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config, "summary": rows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()

"""Disaggregated vs colocated on the same GPUs: start each layout with `pdserve up`, sweep it, stop it.

    python benchmarks/pd_vs_colocated.py --model qwen2.5-32b --gpus 0,1 \\
        --layouts colocated:2,pd:1:1 --rates 0.5,1,2,4 --num-prompts 64 --out-dir results/

Each layout gets a fresh cluster (dummy weights unless --load-format auto), a `pdserve bench sweep`
with the seed workload (1100 in, 140 out, EOS ignored) and the loose SLO; results land in
OUT_DIR/<model>-<layout>.json, with each cluster's logs beside them. benchmarks/pd_report.py turns
them into the table of docs/benchmarks.md (and recomputes goodput under other SLOs from the
per-request latencies in the files).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import start, stop, wait_healthy  # benchmarks/ is sys.path[0]


def layout_args(layout: str) -> tuple[str, list[str]]:
    """'colocated:2' -> instances 2; 'pd:2:1' -> 2 prefill + 1 decode. Returns (label, up arguments)."""
    kind, *counts = layout.split(":")
    if kind == "colocated" and len(counts) == 1:
        return f"colocated{counts[0]}", ["--instances", counts[0]]
    if kind == "pd" and len(counts) == 2:
        return f"{counts[0]}p{counts[1]}d", ["--prefill", counts[0], "--decode", counts[1]]
    raise ValueError(f"layout {layout!r}: use colocated:N or pd:P:D")


def run_layout(layout: str, args: argparse.Namespace, extra: list[str]) -> Path:
    label, up_args = layout_args(layout)
    name = f"{Path(args.model).name}-{label}"
    out = Path(args.out_dir)
    logs = out / f"logs-{name}"
    url = f"http://127.0.0.1:{args.port}"
    up = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "up",
        *up_args,
        "--model",
        args.model,
        "--port",
        str(args.port),
    ]
    up += [
        "--log-dir",
        str(logs),
        "--load-format",
        args.load_format,
        *(["--gpus", args.gpus] if args.gpus else []),
    ]
    up += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    up += extra
    print(f"== {name}: {' '.join(up)}", flush=True)
    proc = start(up)
    try:
        wait_healthy(url, [proc], args.startup_timeout)
        result = out / f"{name}.json"
        bench = [sys.executable, "-m", "pdserve.cli", "bench", "sweep", "--base-url", url, "--label", label]
        bench += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos"]
        bench += ["--num-prompts", str(args.num_prompts), "--rates", args.rates, "--slo", args.slo]
        bench += ["--min-attainment", str(args.min_attainment), "--output", str(result), "--disable-tqdm"]
        bench += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        bench += ["--arrival-seconds", str(args.arrival_seconds)] if args.arrival_seconds else []
        subprocess.run(bench, check=True)
        return result
    finally:
        stop([proc], timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-32b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--gpus", default=None)
    ap.add_argument("--tokenizer", default=None, help="for instances and prompts (dummy shapes have none)")
    ap.add_argument("--layouts", default="colocated:2,pd:1:1")
    ap.add_argument("--rates", default="0.5,1,2,4")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--arrival-seconds", type=float, default=None, help="per rate, at least (bench sweep)")
    ap.add_argument("--input-len", type=int, default=1100)
    ap.add_argument("--output-len", type=int, default=140)
    ap.add_argument("--slo", default="ttft=2000,tpot=100")
    ap.add_argument("--min-attainment", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--out-dir", default="bench-results")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `pdserve serve` options")
    args = ap.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for layout in args.layouts.split(","):
        print(f"wrote {run_layout(layout, args, extra)}", flush=True)


if __name__ == "__main__":
    main()

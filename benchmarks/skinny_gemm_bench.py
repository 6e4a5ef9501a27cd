"""Experiment: can a Triton skinny GEMM beat cuBLAS on the decode projections at small batch?

The 7B decode profile (docs/performance.md) shows cuBLAS at M=1 reading the qkv (33 MB) and o (26 MB)
weights at only 66-72% of the copy ceiling, o and down adding a split-K reduce launch each, while the
large gate/up reaches 93%. This times y = x @ W^T (+ bias) for the projection shapes of Qwen2.5-7B
(and, with --models, Qwen2.5-32B) at M = 1, 8, 32 both ways: cuBLAS (F.linear) and a Triton kernel
swept over tiles, each as 20 launches replayed from a CUDA graph (eager Triton launches cost more host
time than the kernel) that cycle through copies of the weight (256 MB in all: the 50 MB L2 cannot
serve them, as in a decode step; before 2026-11-30 one copy was reused and small weights partly came
from L2), and checks the Triton result against F.linear. The kernel is the one in
pdserve/kernels/triton_skinny.py; `planned_us` is the tile its plan() picks for this shape, if any.

    python benchmarks/skinny_gemm_bench.py --output skinny_gemm.json

--gated times gate_up with SiLU(gate) * up in the skinny kernel's epilogue against what it replaces
(cuBLAS, then the silu_and_mul kernel):

    python benchmarks/skinny_gemm_bench.py --gated --m 32,64,128 --models qwen2.5-7b,qwen2.5-32b

Past 32 rows the skinny kernel is swept over ROW_TILES (shorter K steps: x's tile grows with M).
"""

from __future__ import annotations

import argparse
import itertools
import json
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
from common import graph_time  # this folder: run as a script
from gpu_engine import ceilings

from pdserve.kernels.sm_count import num_sms
from pdserve.kernels.triton_fused import silu_and_mul
from pdserve.kernels.triton_skinny import plan, skinny_linear
from pdserve.kernels.tuning.tables import tuning_for

MODELS = {  # per model, name: (N, K, bias) of its projections at TP 1
    "qwen2.5-7b": {
        "qkv": (4608, 3584, True),
        "o": (3584, 3584, False),
        "gate_up": (37888, 3584, False),
        "down": (3584, 18944, False),
    },
    "qwen2.5-32b": {
        "qkv": (7168, 5120, True),
        "o": (5120, 5120, False),
        "gate_up": (55296, 5120, False),
        "down": (5120, 27648, False),
    },
    "qwen3-8b": {  # pdserve/model_configs (no qkv bias)
        "qkv": (6144, 4096, False),
        "o": (4096, 4096, False),
        "gate_up": (24576, 4096, False),
        "down": (4096, 12288, False),
    },
    "qwen3-32b": {
        "qkv": (10240, 5120, False),
        "o": (5120, 8192, False),
        "gate_up": (51200, 5120, False),
        "down": (5120, 25600, False),
    },
    "llama-3.1-8b": {
        "qkv": (6144, 4096, False),
        "o": (4096, 4096, False),
        "gate_up": (28672, 4096, False),
        "down": (4096, 14336, False),
    },
}
L2_FLUSH_BYTES = 256 << 20  # weight bytes cycled per shape, over 5x the H200's 50 MB L2
TILES = list(itertools.product([16, 32, 64], [256, 512], [3, 4], [4]))  # BLOCK_N, BLOCK_K, stages, warps
ROW_TILES = list(itertools.product([64, 128, 256], [64, 128], [3, 4], [4, 8]))  # past 32 rows


def save(path: str, ceiling: float, results: list[dict[str, Any]]) -> None:
    """The results as JSON, with the GPU, the date and the copy ceiling they are fractions of."""
    with open(path, "w") as f:
        payload = {"device": torch.cuda.get_device_name(), "date": date.today().isoformat()}
        json.dump({**payload, "copy_gbps": ceiling, "results": results}, f, indent=1)


def _gated(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: Any) -> torch.Tensor:
    return skinny_linear(x, w, tile, b, gated=True)


def _plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: Any) -> torch.Tensor:
    return skinny_linear(x, w, tile, b)


def bench_shape(model: str, name: str, m: int, ceiling: float, gated: bool = False) -> dict[str, Any]:
    n, k, has_bias = MODELS[model][name]
    copies = -(-L2_FLUSH_BYTES // (n * k * 2))  # launches cycle through these: weights come from HBM
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    w = ws[0]
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = (silu_and_mul(F.linear(x, w)) if gated else F.linear(x, w, b)).float()
    if gated:  # what linear.silu_mul_linear runs without the fused kernel
        cublas = graph_time(lambda i: silu_and_mul(F.linear(x, ws[i % copies])))
    else:
        cublas = graph_time(lambda i: F.linear(x, ws[i % copies], b))
    planned: Any = plan(n, num_sms(x.device), m, tuning_for("auto", x.device).skinny)
    run: Any = _gated if gated else _plain
    planned_us = float("nan")
    timings: list[tuple[float, Any]] = []  # (seconds, tile)
    tiles: list[Any] = list(ROW_TILES if m > 32 else TILES)
    tiles += ROW_TILES if gated and m <= 32 else []
    for tile in tiles + ([planned] if planned and planned not in tiles else []):
        try:
            y = run(x, w, b, tile)
            err = ((y.float() - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                print(f"{name} M={m} tile {tile}: wrong (rel err {err:.3g})", flush=True)
                continue
            t = graph_time(lambda i, tile=tile: run(x, ws[i % copies], b, tile))
        except Exception as exc:  # a tile that does not fit (shared memory) is skipped
            print(f"{name} M={m} tile {tile}: {type(exc).__name__}", flush=True)
            continue
        if tile == planned:
            planned_us = t * 1e6
        timings.append((t, tile))
    nbytes = w.numel() * 2
    out = {"model": model, "shape": name + ("+silu" if gated else ""), "m": m, "weight_mb": nbytes / 1e6,
           "cublas_us": cublas * 1e6, "cublas_of_ceiling": nbytes / cublas / 1e9 / ceiling}  # fmt: skip
    if planned is not None:
        out.update(planned_tile=planned, planned_us=planned_us)
    if timings:
        fastest = sorted(timings, key=lambda timed: timed[0])
        t, tile = fastest[0]
        out.update(triton_us=t * 1e6, tile=tile, triton_of_ceiling=nbytes / t / 1e9 / ceiling)
        out.update(fastest_tiles=[(round(s * 1e6, 2), tiled) for s, tiled in fastest[:4]])
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,8,32")
    ap.add_argument("--models", default="qwen2.5-7b", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--output", default=None)
    ap.add_argument(
        "--gated", action="store_true", help="gate_up with SiLU*up fused vs cuBLAS + silu_and_mul"
    )
    args = ap.parse_args()
    ceiling = ceilings()["copy_gbps"]  # as gpu_engine.py measures it (a graph-captured copy ran ~35% slower)
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    results = [
        bench_shape(model, name, int(m), ceiling, args.gated)
        for model in args.models.split(",")
        for m in args.m.split(",")
        for name in MODELS[model]
        if name == "gate_up" or not args.gated
    ]
    if args.output:
        save(args.output, ceiling, results)


if __name__ == "__main__":
    main()

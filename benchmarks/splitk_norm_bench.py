"""The row-parallel projections' split-K reduce moved into the residual-add + RMSNorm after them
(pdserve/kernels/split_k.py), against cuBLAS's split-K GEMM then the add-RMSNorm, per shape and rows.

At 64-128 rows cuBLAS runs 7B's down_proj (and o_proj) as a split-K GEMM plus a reduce launch
(docs/performance.md, the tenth session's profile: 0.11 ms a step of reduce at B=128). split_k
computes the product as a batched GEMM over S slices of K (torch.bmm with fp32 outputs: S partial
sums, no reduce), and triton_fused's add-RMSNorm kernel sums the partials (rounded once to the
activation dtype, as F.linear's output is) before adding the residual. Each variant is timed as it runs in a
step: `layers` products each with its own weight (so weights come from HBM), each followed by the
norm, captured in one CUDA graph and replayed; results as us per layer, and the max relative error
of the norm's output against the cuBLAS path.

    python benchmarks/splitk_norm_bench.py --output splitk_norm.json
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
from common import graph_time  # this folder: run as a script

from pdserve.kernels.split_k import Partials, partial_products
from pdserve.kernels.triton_fused import add_rms_norm, triton_add_partials_rms_norm

SHAPES = {  # name: (N, K) at TP 1
    "7b-down": (3584, 18944),
    "7b-o": (3584, 3584),
    "32b-down": (5120, 27648),
    "32b-o": (5120, 5120),
    "qwen3-8b-down": (4096, 12288),
    "llama-8b-down": (4096, 14336),
    "qwen3-32b-down": (5120, 25600),
}


def partials_norm(p: Partials, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return triton_add_partials_rms_norm(p.parts, r, w, 1e-6)[0]


def bench(name: str, m: int, layers: int, splits_list: list[int]) -> dict[str, Any]:
    n, k = SHAPES[name]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    g = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5

    def us(fn: Any) -> float:  # fn(i): layer i's work; a layer's time in the graph of all of them
        return float(graph_time(fn, launches=layers)) * 1e6

    want = add_rms_norm(F.linear(x, ws[0]), r, g, 1e-6)[0].float()
    row: dict[str, Any] = {"shape": name, "m": m, "weight_mb": n * k * 2 / 1e6}
    row["cublas_us"] = us(lambda i: add_rms_norm(F.linear(x, ws[i]), r, g, 1e-6))
    row["gemm_only_us"] = us(lambda i: F.linear(x, ws[i]))
    for s in splits_list:
        if k % s:
            continue
        got = partials_norm(partial_products(x, ws[0], s), r, g).float()
        row[f"err_s{s}"] = ((got - want).abs().max() / want.abs().max()).item()
        row[f"split{s}_us"] = us(lambda i, s=s: partials_norm(partial_products(x, ws[i], s), r, g))
        row[f"bmm{s}_only_us"] = us(lambda i, s=s: partial_products(x, ws[i], s))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7b-down,7b-o,32b-down,32b-o")
    ap.add_argument("--m", default="32,64,128")
    ap.add_argument("--splits", default="1,2,3,4,6,8")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--output", default="splitk_norm.json")
    args = ap.parse_args()
    splits = [int(s) for s in args.splits.split(",")]
    rows = [bench(s, int(m), args.layers, splits) for s in args.shapes.split(",") for m in args.m.split(",")]
    with open(args.output, "w") as f:
        meta = {"device": torch.cuda.get_device_name(), "date": date.today().isoformat()}
        json.dump({**meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()

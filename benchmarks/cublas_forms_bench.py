"""Experiment: does cuBLAS stream a decode projection at 64-128 rows faster in another form?

At 128 rows cuBLAS runs Qwen2.5-7B's down projection at ~71% of the copy ceiling plus a split-K
reduce launch, qkv and o at 60-64% (docs/performance.md), and two Triton kernels for these rows lost
to it. This times, per projection shape and row count, y = x @ W^T as F.linear does it and in the
swapped form small-M kernels elsewhere use (y^T = W @ x^T: cuBLAS sees N as its M; plus the
transpose copy back to [M, N] the engine would need), each with cuBLAS and with cuBLASLt, replayed
from a CUDA graph over weight copies cycled past the L2 (common.graph_time).

    python3 benchmarks/cublas_forms_bench.py --m 64,128 --models qwen2.5-7b --output cublas_forms.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
from common import graph_time  # this folder: run as a script
from gpu_engine import ceilings
from skinny_gemm_bench import L2_FLUSH_BYTES, MODELS, save

FORMS = {
    "linear": lambda x, w: F.linear(x, w),
    "swapped": lambda x, w: torch.mm(w, x.t()).t().contiguous(),
    "swapped_no_copy": lambda x, w: torch.mm(w, x.t()),
}


def bench(model: str, name: str, m: int, ceiling: float) -> dict[str, Any]:
    n, k, _ = MODELS[model][name]
    copies = -(-L2_FLUSH_BYTES // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, ws[0]).float()
    out: dict[str, Any] = {"model": model, "shape": name, "m": m, "weight_mb": n * k * 2 / 1e6}
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for form, fn in FORMS.items():
            got = fn(x, ws[0]).float()
            got = got.t() if form == "swapped_no_copy" else got
            assert (got - want).abs().max() <= 2e-2 * want.abs().max(), (form, library)
            t = graph_time(lambda i, fn=fn: fn(x, ws[i % copies]))
            out[f"{library}_{form}_us"] = round(t * 1e6, 2)
            out[f"{library}_{form}_of_ceiling"] = round(n * k * 2 / t / 1e9 / ceiling, 3)
    torch.backends.cuda.preferred_blas_library("cublas")
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="64,128")
    ap.add_argument("--models", default="qwen2.5-7b")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    ceiling = ceilings()["copy_gbps"]
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    results = [
        bench(model, name, int(m), ceiling)
        for model in args.models.split(",")
        for m in args.m.split(",")
        for name in MODELS[model]
    ]
    if args.output:
        save(args.output, ceiling, results)


if __name__ == "__main__":
    main()

"""Experiment: can a Triton skinny GEMM beat cuBLAS on the decode projections at small batch?

The 7B decode profile (docs/performance.md) shows cuBLAS at M=1 reading the qkv (33 MB) and o (26 MB)
weights at only 66-72% of the copy ceiling, o and down adding a split-K reduce launch each, while the
large gate/up reaches 93%. This times y = x @ W^T (+ bias) for the projection shapes of Qwen2.5-7B
(and, with --models, Qwen2.5-32B) at M = 1, 8, 32 both ways: cuBLAS (F.linear) and a Triton kernel
swept over tiles, each as 20 launches replayed from a CUDA graph (eager Triton launches cost more host
time than the kernel), and checks the Triton result against F.linear. The same kernel, with the tiles
the 7B run picked, is pdserve/layers/triton_skinny.py (opt-in until measured inside the engine).

    python benchmarks/skinny_gemm_bench.py --output skinny_gemm.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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
}
TILES = list(itertools.product([16, 32, 64], [256, 512], [3, 4], [4]))  # BLOCK_N, BLOCK_K, stages, warps


@triton.jit
def _skinny_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[:, n tile] = x @ W[n tile]^T: each program streams BLOCK_N weight rows once."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0
        )
        w = tl.load(
            w_ptr + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0
        )
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: tuple, y: torch.Tensor
) -> None:
    block_n, block_k, stages, warps = tile
    m, k = x.shape
    n = w.shape[0]
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, w, b if b is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=b is not None, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_stages=stages, num_warps=warps,
    )  # fmt: skip


def graph_time(fn: Any, launches: int = 20, replays: int = 20) -> float:
    """Seconds per launch of fn, `launches` of them captured in one CUDA graph, median of replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return sorted(times)[len(times) // 2]


def copy_ceiling() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / graph_time(lambda: dst.copy_(src), launches=5) / 1e9


def bench_shape(model: str, name: str, m: int, ceiling: float) -> dict[str, Any]:
    n, k, has_bias = MODELS[model][name]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, w, b).float()
    cublas = graph_time(lambda: F.linear(x, w, b))
    best: tuple[float, tuple] | None = None
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    for tile in TILES:
        try:
            skinny_linear(x, w, b, tile, y)
            err = ((y.float() - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                print(f"{name} M={m} tile {tile}: wrong (rel err {err:.3g})", flush=True)
                continue
            t = graph_time(lambda tile=tile: skinny_linear(x, w, b, tile, y))
        except Exception as exc:  # a tile that does not fit (shared memory) is skipped
            print(f"{name} M={m} tile {tile}: {type(exc).__name__}", flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, tile)
    nbytes = w.numel() * 2
    out = {"model": model, "shape": name, "m": m, "weight_mb": nbytes / 1e6, "cublas_us": cublas * 1e6,
           "cublas_of_ceiling": nbytes / cublas / 1e9 / ceiling}  # fmt: skip
    if best is not None:
        out.update(triton_us=best[0] * 1e6, tile=best[1], triton_of_ceiling=nbytes / best[0] / 1e9 / ceiling)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,8,32")
    ap.add_argument("--models", default="qwen2.5-7b", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    ceiling = copy_ceiling()
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    results = [
        bench_shape(model, name, int(m), ceiling)
        for model in args.models.split(",")
        for m in args.m.split(",")
        for name in MODELS[model]
    ]
    if args.output:
        with open(args.output, "w") as f:
            payload = {"device": torch.cuda.get_device_name(), "date": date.today().isoformat()}
            json.dump({**payload, "copy_gbps": ceiling, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

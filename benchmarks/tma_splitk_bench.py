"""Experiment: a split-K GEMM on Hopper's TMA loads for 64-128 rows of x, against cuBLAS.

At 128 rows (decode batch 128) cuBLAS runs the 7B down projection (N 3584, K 18944) at ~75% of the
copy ceiling plus a split-K reduce launch, o and qkv at ~60%; the one 7B decode target not met
(B=128, 75% of the bound) needs ~0.4 ms a step. The eighth session's split-K kernel (pointer loads,
cp.async) was slower than cuBLAS everywhere; this one loads x and W tiles through tensor descriptors
(TMA, so Triton pipelines its wgmma), splits K over grid.y so the programs fill one wave, and sums the
splits in the last program to finish a column tile (an arrival counter; fp32 partials through the
L2), so there is no second launch. Timed as skinny_gemm_bench times: 20 launches in a CUDA graph,
cycling copies of the weight past the L2; checked against F.linear.

    python benchmarks/tma_splitk_bench.py --m 64,128 --output tma_splitk.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gpu_engine import ceilings  # this folder: run as a script
from skinny_gemm_bench import L2_FLUSH_BYTES, MODELS, graph_time, save
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tma_splitk_kernel(
    x_desc, w_desc, b_ptr, part_ptr, count_ptr, y_ptr, M, N, K, k_per_split,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLITS: tl.constexpr, K_STEPS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """y[:, tile] = x @ W[tile]^T (+ b); program (tile, s) sums K range s; the last to arrive adds
    the others' fp32 partials and stores y (the counter is left at 0 for the next launch)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    k_lo = pid_s * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in tl.range(0, K_STEPS, num_stages=STAGES):  # past K: TMA reads zeros
        x = x_desc.load([0, k_lo + i * BLOCK_K])
        w = w_desc.load([n0, k_lo + i * BLOCK_K])
        acc = tl.dot(x, w.T, acc)
    m = tl.arange(0, BLOCK_M)
    n = n0 + tl.arange(0, BLOCK_N)
    mask = (m[:, None] < M) & (n[None, :] < N)
    out = y_ptr + m[:, None] * N + n[None, :]
    last = True
    if SPLITS > 1:
        tl.store(part_ptr + (pid_s * BLOCK_M + m[:, None]) * N + n[None, :], acc, mask=mask)
        tl.debug_barrier()
        last = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLITS - 1
        if last:
            tl.debug_barrier()
            for s in range(SPLITS):  # the others' partials into this program's own sum
                part = part_ptr + (s * BLOCK_M + m[:, None]) * N + n[None, :]
                acc += tl.load(part, mask=mask & (s != pid_s), other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid_n, 0)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


Tile = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, splits, stages, warps


class SplitK:
    """One shape's launches: the counters (zeroed once; each launch leaves them at 0) and partials."""

    def __init__(self, m: int, n: int, k: int, tile: Tile) -> None:
        block_n, block_k, splits, _, _ = tile
        self.block_m = max(64, triton.next_power_of_2(m))
        self.tile, self.n, self.k = tile, n, k
        self.k_per_split = triton.cdiv(triton.cdiv(k, block_k), splits) * block_k
        self.counts = torch.zeros(triton.cdiv(n, block_n), dtype=torch.int32, device="cuda")
        self.parts = torch.empty(splits * self.block_m, n, dtype=torch.float32, device="cuda")

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        block_n, block_k, splits, stages, warps = self.tile
        y = torch.empty(x.shape[0], self.n, dtype=x.dtype, device=x.device)
        x_desc = TensorDescriptor.from_tensor(x, [self.block_m, block_k])
        w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k])
        grid = (triton.cdiv(self.n, block_n), splits)
        _tma_splitk_kernel[grid](
            x_desc, w_desc, w if b is None else b, self.parts, self.counts, y, x.shape[0], self.n,
            self.k, self.k_per_split, HAS_BIAS=b is not None, BLOCK_M=self.block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, SPLITS=splits, K_STEPS=self.k_per_split // block_k, STAGES=stages, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return y


def tiles_for(n: int, sms: int) -> list[Tile]:
    """Tiles whose (column tiles x splits) programs fill about one wave, or two."""
    out = []
    for block_n, block_k, stages, warps in [
        (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 8), (128, 64, 4, 4), (128, 128, 3, 8),
        (256, 64, 3, 8), (256, 64, 4, 8),
    ]:  # fmt: skip
        tiles = triton.cdiv(n, block_n)
        for splits in sorted({max(1, sms // tiles), max(1, round(sms / tiles))}):
            out.append((block_n, block_k, splits, stages, warps))
    return out


def bench(model: str, name: str, m: int, ceiling: float) -> dict[str, Any]:
    n, k, has_bias = MODELS[model][name]
    copies = -(-L2_FLUSH_BYTES // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cublas = graph_time(lambda i: F.linear(x, ws[i % copies], b))
    timings: list[tuple[float, Tile]] = []
    for tile in tiles_for(n, sms):
        try:
            run = SplitK(m, n, k, tile)
            for w in ws[:2]:  # twice: the counters must be back at 0 after a launch
                want = F.linear(x, w, b).float()
                err = ((run(x, w, b).float() - want).abs().max() / want.abs().max()).item()
                if err > 2e-2:
                    raise ValueError(f"wrong (rel err {err:.3g})")
            t = graph_time(lambda i, run=run: run(x, ws[i % copies], b))
        except Exception as exc:  # a tile that does not fit (shared memory) is skipped
            print(f"{name} M={m} tile {tile}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
            continue
        timings.append((t, tile))
    nbytes = n * k * 2
    out: dict[str, Any] = {"model": model, "shape": name, "m": m, "cublas_us": cublas * 1e6,
                           "cublas_of_ceiling": nbytes / cublas / 1e9 / ceiling}  # fmt: skip
    if timings:
        fastest = sorted(timings)
        t, tile = fastest[0]
        out.update(tma_us=t * 1e6, tile=tile, tma_of_ceiling=nbytes / t / 1e9 / ceiling)
        out.update(fastest_tiles=[(round(s * 1e6, 2), tiled) for s, tiled in fastest[:5]])
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="64,128")
    ap.add_argument("--models", default="qwen2.5-7b")
    ap.add_argument("--shapes", default="down,o,qkv")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    ceiling = ceilings()["copy_gbps"]
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    results = [
        bench(model, name, int(m), ceiling)
        for model in args.models.split(",")
        for m in args.m.split(",")
        for name in args.shapes.split(",")
    ]
    if args.output:
        save(args.output, ceiling, results)


if __name__ == "__main__":
    main()

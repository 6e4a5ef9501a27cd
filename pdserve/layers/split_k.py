"""Down projections as K-split partial sums whose reduce is left to the residual-add + RMSNorm after them.

At decode batch sizes cuBLAS runs a down_proj (K >> N) as a split-K GEMM plus a reduce launch (the 7B
profile at 128 rows, docs/performance.md). Here the product is instead a batched GEMM over S slices of K
(torch.bmm with fp32 outputs, views of x and W, no copies) giving S partial sums, and the add-RMSNorm
kernel that follows (triton_fused.triton_add_partials_rms_norm) sums them, rounds the sum to the
activation dtype as F.linear's output is, then adds the residual: one launch fewer a layer, and cuBLAS's
batched kernel is itself faster at these shapes. benchmarks/splitk_norm_bench.py (one H200, 8 layers in
a CUDA graph, weights from HBM, us a layer for GEMM + norm;
docs/bench/h200/splitk_norm*-2026-12-01.json): S=2 wins 2-6 us at 72-128 rows on every down shape (7B
45.7 -> 41.7 at 128), and at 192/256 rows on the 8B-class ones (7B 53.3 -> 47.4, 57.0 -> 53.7) but not
the 32B ones (32B at 192: 95.4 vs 108.2); at 64 rows (7B 42.4 vs 43.4) and for o_proj (7B 12.7 vs 13.1
at 128) none, so they are left to cuBLAS. In the engine (ab nosplit, one H200, launched ahead): 7B B=128
6.69, 6.71 -> 6.56, 6.57 ms; B=120 6.63, 6.63 -> 6.51, 6.49.

`SPLITS` holds the measured shapes; `splits_for` says whether a product takes this path (CUDA, 2-D
contiguous x, fp16/bf16, no bias, tp=1: RowParallelLinear asks only then). PDSERVE_SPLIT_NORM=0
turns it off. `Partials.total()` gives the plain sum for any consumer other than the norm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENABLED = os.environ.get("PDSERVE_SPLIT_NORM", "1") != "0"
# (N, K) of a down_proj weight -> ((first rows, last rows, S), ...): x's row counts taking S slices
SPLITS: dict[tuple[int, int], tuple[tuple[int, int, int], ...]] = {
    (3584, 18944): ((72, 256, 2),),  # Qwen2.5-7B
    (4096, 12288): ((72, 256, 2),),  # Qwen3-8B
    (4096, 14336): ((72, 256, 2),),  # Llama-3.1-8B
    (5120, 27648): ((72, 128, 2),),  # Qwen2.5-32B
    (5120, 25600): ((72, 128, 2),),  # Qwen3-32B
}


@dataclass(frozen=True)
class Partials:
    """x @ W^T as `parts` [S, rows, N] fp32 partial sums over K slices, in activations of `dtype`."""

    parts: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    def total(self) -> torch.Tensor:
        """The product as F.linear gives it: the partials summed in fp32, rounded once to `dtype`."""
        return self.parts.sum(0).to(self.dtype)


def splits_for(x: torch.Tensor, weight: torch.Tensor) -> int:
    """S for x @ weight^T, or 0 where the plain product is taken."""
    if not (ENABLED and x.is_cuda and x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()):
        return 0
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return 0
    rows = x.shape[0]
    for low, high, splits in SPLITS.get((weight.shape[0], weight.shape[1]), ()):
        if low <= rows <= high and weight.shape[1] % splits == 0:
            return splits
    return 0


def partial_products(x: torch.Tensor, weight: torch.Tensor, splits: int) -> Partials:
    """x [M, K] @ weight [N, K]^T as `splits` fp32 partial sums over equal slices of K."""
    m, k = x.shape
    n = weight.shape[0]
    part = k // splits
    xs = x.view(m, splits, part).transpose(0, 1)  # [S, M, part]
    ws = weight.view(n, splits, part).permute(1, 2, 0)  # [S, part, N]
    if x.is_cuda and x.dtype != torch.float32:
        return Partials(torch.bmm(xs, ws, out_dtype=torch.float32), x.dtype)
    return Partials(torch.bmm(xs.float(), ws.float()), x.dtype)  # fp32, or CPU (no bmm out_dtype there)

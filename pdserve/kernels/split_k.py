"""Down projections as K-split partial sums whose reduce is left to the residual-add + RMSNorm after them.

At decode batch sizes cuBLAS runs a down_proj (K >> N) as a split-K GEMM plus a reduce launch. Here the
product is instead a batched GEMM over S slices of K (torch.bmm with fp32 outputs, views of x and W, no
copies) giving S partial sums, and the add-RMSNorm kernel that follows
(triton_fused.triton_add_partials_rms_norm) sums them, rounds the sum to the activation dtype as
F.linear's output is, then adds the residual: one launch fewer a layer, and cuBLAS's batched kernel is
itself faster at these shapes. Only the down_proj shapes and row counts where that was measured faster
(benchmarks/splitk_norm_bench.py and engine A/Bs, docs/performance.md) take it: the tuning file's
`split_k` table; o_proj and 64 rows or fewer are left to cuBLAS.

`split_products` says whether a product takes this path (CUDA, 2-D contiguous x, fp16/bf16, no bias,
tp=1: RowParallelLinear asks only then); `KernelConfig.split_norm=off` turns it off.
`Partials.total()` gives the plain sum for any consumer other than the norm. No triton here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Splits = dict[tuple[int, int], tuple[tuple[int, int, int], ...]]  # (N, K) -> ((first, last rows, S), ...)


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


def split_products(x: torch.Tensor, weight: torch.Tensor, table: Splits) -> Partials | None:
    """x @ weight^T as Partials where `table` holds this shape and x's row count, else None."""
    splits = splits_for(x, weight, table)
    return partial_products(x, weight, splits) if splits else None


def splits_for(x: torch.Tensor, weight: torch.Tensor, table: Splits) -> int:
    """S for x @ weight^T, or 0 where the plain product is taken."""
    if not (x.is_cuda and x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()):
        return 0
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return 0
    rows = x.shape[0]
    for low, high, splits in table.get((weight.shape[0], weight.shape[1]), ()):
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

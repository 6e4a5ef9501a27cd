"""The fused MoE experts in Triton: tokens sorted by expert, one grouped GEMM for gate_up with SiLU * up
in its epilogue, one for down with the routing weight in its epilogue, then the k outputs of each token
summed.

    topk_ids [T, K] --align_by_expert--> sorted_ids [P]: assignment numbers (t * K + k) grouped by
                                          expert, each expert's run padded to a multiple of BLOCK_M
                                          (padding = T * K, "no row"); block_expert [P / BLOCK_M]: the
                                          expert of each BLOCK_M rows, -1 past the last
    gate_up kernel: rows x[sorted_ids // K] @ w13[e]^T -> SiLU(gate) * up -> inter [P, I] (sorted order)
    down kernel:    inter rows @ w2[e]^T * weight -> out[sorted_ids] [T * K, H];  y = out.view(T, K, H).sum(1)

P is bounded by T * K + min(E, T * K) * (BLOCK_M - 1), so every size is known on the host and nothing
waits for the GPU: a decode step's CUDA graph captures it. A block past the used rows exits at once.
Each program reads its expert's weight tile once for up to BLOCK_M tokens: at decode (a few tokens per
expert) the step streams each hit expert's weights once, at prefill the tiles are ordinary GEMM tiles.
Rounding follows the torch reference (layers/moe.experts_torch): products rounded to the activations'
dtype, SiLU rounded, then the product; the weighted down output rounded before the sum over k.

This module imports triton: only layers/moe.py imports it, when the kernel config chooses Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoeTiles:
    block_m: int  # rows (token-expert assignments) of one program; every block holds one expert's
    gate_up_n: int  # intermediate columns per gate_up program (each needs gate and up tiles)
    down_n: int  # hidden columns per down program
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


DECODE_TILES = MoeTiles(block_m=16, gate_up_n=32, down_n=64, block_k=128, num_warps=4, num_stages=4)
PREFILL_TILES = MoeTiles(block_m=64, gate_up_n=64, down_n=128, block_k=64, num_warps=4, num_stages=3)


def tiles_for(num_assignments: int, num_experts: int) -> MoeTiles:
    """Small tiles while an expert gets few rows (decode), GEMM tiles once they average 32+ rows."""
    return PREFILL_TILES if num_assignments >= 32 * num_experts else DECODE_TILES


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P] int32, block_expert [P / block_m] int32) for topk_ids [T, K], in torch ops only."""
    flat = topk_ids.reshape(-1)
    m = flat.numel()
    used = min(num_experts, m)
    capacity = triton.cdiv(m + used * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)  # assignment numbers grouped by expert
    experts = flat[order]
    first = torch.cumsum(counts, 0) - counts  # where each expert's run starts in `order`
    rank = torch.arange(m, device=flat.device) - first[experts]
    sorted_ids = torch.full((capacity,), m, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, starts[experts] + rank, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(  # type: ignore[no-untyped-def]
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    weights_ptr,
    num_assignments,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,  # gate_up: A rows gathered from x, SiLU(gate) * up, stored in sorted order
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    valid = ids < num_assignments
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # gate_up reads token rows of x; down reads gate_up's output rows, which are in sorted order
    a_rows = (ids // TOP_K).to(tl.int64) if GATED else offs_m.to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        if GATED:  # the up rows sit N rows below the gate rows
            up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up += tl.dot(a, up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _moe_store(acc, acc_up, out_ptr, weights_ptr, ids, offs_m, offs_n, valid, n_ok, stride_om, GATED)


@triton.jit
def _moe_store(  # type: ignore[no-untyped-def]
    acc, acc_up, out_ptr, weights_ptr, ids, offs_m, offs_n, valid, n_ok, stride_om, GATED: tl.constexpr
):  # fmt: skip
    """The epilogue of both GEMMs (also triton_moe_quant's): gate_up stores SiLU(gate) * up in sorted
    order, down the output times the routing weight at the assignment's row; rounded as the reference."""
    dtype = out_ptr.dtype.element_ty
    mask = valid[:, None] & n_ok[None, :]
    if GATED:
        gate = acc.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        h = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], h, mask=mask)
    else:
        weight = tl.load(weights_ptr + ids, mask=valid, other=0.0).to(dtype).to(tl.float32)
        y = (acc.to(dtype).to(tl.float32) * weight[:, None]).to(dtype)
        tl.store(out_ptr + ids.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y, mask=mask)


@dataclass(frozen=True)
class Routed:
    """One call's assignments sorted by expert (align_by_expert), what both GEMMs' launches share."""

    sorted_ids: torch.Tensor  # [P] int32
    block_expert: torch.Tensor  # [P / tiles.block_m] int32
    weights: torch.Tensor  # [T * K] routing weights, by assignment number
    top_k: int
    tiles: MoeTiles
    precision: str  # tl.dot's: "ieee" for float32 activations (exact products, not tf32)

    @property
    def num_assignments(self) -> int:
        return self.weights.numel()


def route(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    tiles: MoeTiles | None,
) -> Routed:
    """The sorted rows for x [T, H] routed by topk_ids / topk_weights [T, K] (tiles by size if None)."""
    m = topk_ids.numel()
    tiles = tiles or tiles_for(m, num_experts)
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts, tiles.block_m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return Routed(sorted_ids, block_expert, topk_weights.reshape(-1), topk_ids.shape[1], tiles, precision)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    tiles: MoeTiles | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows over up rows), w2 [E, H, I], topk_ids / topk_weights [T, K]
    -> sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), [T, H] in x's dtype."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    i = two_i // 2
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1 and w13.shape[2] == h
    r = route(x, topk_ids, topk_weights, e, tiles)
    tt, m, k = r.tiles, r.num_assignments, r.top_k
    inter = x.new_empty(r.sorted_ids.numel(), i)  # SiLU(gate) * up, sorted rows; padding rows never read
    grid = (r.block_expert.numel(), triton.cdiv(i, tt.gate_up_n))
    _moe_gemm_kernel[grid](
        x, w13, inter, r.sorted_ids, r.block_expert, r.weights, m, i, h,
        x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        TOP_K=k, GATED=True, BLOCK_M=tt.block_m, BLOCK_N=tt.gate_up_n, BLOCK_K=tt.block_k,
        DOT_PRECISION=r.precision, num_warps=tt.num_warps, num_stages=tt.num_stages,
    )  # fmt: skip
    out = x.new_empty(m, h)
    grid = (r.block_expert.numel(), triton.cdiv(h, tt.down_n))
    _moe_gemm_kernel[grid](
        inter, w2, out, r.sorted_ids, r.block_expert, r.weights, m, h, i,
        inter.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=k, GATED=False, BLOCK_M=tt.block_m, BLOCK_N=tt.down_n, BLOCK_K=tt.block_k,
        DOT_PRECISION=r.precision, num_warps=tt.num_warps, num_stages=tt.num_stages,
    )  # fmt: skip
    return out.view(t, k, h).sum(dim=1)

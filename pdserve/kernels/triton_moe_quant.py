"""The fused MoE of triton_moe.py with quantized experts: the same rows sorted by expert, the same two
grouped GEMMs and epilogues, but each expert's weight tile crosses memory quantized and is dequantized
in registers, as triton_wquant.py does for a dense projection, in layers/quant.py's layout (stacked
per expert: R = 2I rows for gate_up, H for down; K = H for gate_up, I for down):

    wint8  int8 [E, R, K], scale [E, R]           tile -> x's dtype (exact: |w| <= 127), tl.dot;
                                                  the row scale once, after the K loop
    wint4  int8 [E, R, K/2], scale [E, R, K/128]  bytes [BLOCK_K/2, BLOCK_N]: (b << 4) >> 4 = even k,
                                                  b >> 4 = odd k; two dots against x's even and odd
                                                  columns; BLOCK_K divides 128, so each step is in one
                                                  group and its product takes that group's scale
    fp8    e4m3 [E, R, K], scale [E, R]           as wint8 (e4m3 -> bf16 / fp16 / fp32 is exact)

fp8 runs weight-only here (activations stay in their dtype, the dot is a 16-bit one): a decode step of
an MoE layer is bound by the expert bytes it streams, which e4m3 halves either way; fp8 dots would add
a quantizing pass over x and another over the intermediate (its per-token scale needs the whole row of
I, which no single program sees), and only pay at prefill, where the per-expert GEMMs are small. So
the GPU result is the dequantized model's, without the CPU reference's per-token rounding of inputs.

This module imports triton: only layers/moe.py imports it, when the kernel config chooses Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_moe import MoeTiles, Routed, _moe_store, route
from pdserve.kernels.triton_wquant import GROUP


@triton.jit
def _int4_part(  # type: ignore[no-untyped-def]
    a_even, a_odd, b_ptrs, b_mask, s_ptrs, n_ok, DTYPE: tl.constexpr, PRECISION: tl.constexpr
):  # fmt: skip
    """One K step of a wint4 tile: bytes [HALF, BN] unpacked, two dots, the step's group scale."""
    b = tl.load(b_ptrs, mask=b_mask, other=0)
    lo = ((b << 4).to(tl.int8) >> 4).to(DTYPE)  # int8 wrap, whatever the promotion
    hi = (b >> 4).to(DTYPE)
    part = tl.dot(a_even, lo, input_precision=PRECISION)
    part += tl.dot(a_odd, hi, input_precision=PRECISION)
    return part * tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]


@triton.jit
def _moe_quant_kernel(  # type: ignore[no-untyped-def]
    a_ptr, w_ptr, s_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr, num_assignments, N, K,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    TOP_K: tl.constexpr, GATED: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    valid = ids < num_assignments
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # gate_up reads token rows of x; down reads gate_up's output rows, which are in sorted order
    rows = (ids // TOP_K).to(tl.int64) if GATED else offs_m.to(tl.int64)
    a_rows = a_ptr + rows[:, None] * stride_am  # [BM, 1]
    w_cols = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BN]
    s_cols = s_ptr + expert * stride_se + offs_n * stride_sn  # [BN]
    w_up, s_up = N * stride_wn, N * stride_sn  # the up rows sit N rows below the gate rows
    dtype: tl.constexpr = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT4:
        HALF: tl.constexpr = BLOCK_K // 2
        for k0 in range(0, K, BLOCK_K):
            j = k0 // 2 + tl.arange(0, HALF)  # bytes of this step; even k = 2j, odd k = 2j + 1 (K is even)
            k_ok = 2 * j < K
            a_mask, w_mask = valid[:, None] & k_ok[None, :], k_ok[:, None] & n_ok[None, :]
            a_even = tl.load(a_rows + 2 * j[None, :], mask=a_mask, other=0.0)
            a_odd = tl.load(a_rows + 2 * j[None, :] + 1, mask=a_mask, other=0.0)
            b_ptrs, s_ptrs = w_cols + j[:, None], s_cols + k0 // GROUP
            acc += _int4_part(a_even, a_odd, b_ptrs, w_mask, s_ptrs, n_ok, dtype, DOT_PRECISION)
            if GATED:
                b_ptrs, s_ptrs = b_ptrs + w_up, s_ptrs + s_up
                acc_up += _int4_part(a_even, a_odd, b_ptrs, w_mask, s_ptrs, n_ok, dtype, DOT_PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            a = tl.load(a_rows + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w = tl.load(w_cols + k[:, None], mask=w_mask, other=0.0)
            acc += tl.dot(a, w.to(dtype), input_precision=DOT_PRECISION)
            if GATED:
                w = tl.load(w_cols + w_up + k[:, None], mask=w_mask, other=0.0)
                acc_up += tl.dot(a, w.to(dtype), input_precision=DOT_PRECISION)
        acc *= tl.load(s_cols, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(s_cols + s_up, mask=n_ok, other=0.0)[None, :]
    _moe_store(acc, acc_up, out_ptr, weights_ptr, ids, offs_m, offs_n, valid, n_ok, stride_om, GATED)


def fused_moe_quant(
    x: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    tiles: MoeTiles | None = None,
) -> torch.Tensor:
    """triton_moe.fused_moe with the experts quantized (the table above): w13 [E, 2I, H] with s13
    [E, 2I] (wint8, fp8), or w13 [E, 2I, H/2] with s13 [E, 2I, ceil(H/128)] (wint4); w2 [E, H, I] /
    [E, H, I/2] with s2 likewise. -> [T, H] in x's dtype."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    int4 = s13.dim() == 3
    i = w2.shape[2] * 2 if int4 else w2.shape[2]
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1 and two_i == 2 * i
    assert w13.shape[2] == (h // 2 if int4 else h) and w2.shape[:2] == (e, h) and (s2.dim() == 3) == int4
    assert not int4 or (s13.stride(2) == 1 and s2.stride(2) == 1)
    r = route(x, topk_ids, topk_weights, e, tiles)
    assert not int4 or GROUP % r.tiles.block_k == 0, "a wint4 K step must stay inside one group"
    inter = x.new_empty(r.sorted_ids.numel(), i)  # SiLU(gate) * up, sorted rows; padding rows never read
    _launch(x, w13, s13, inter, r, (i, h), gated=True)
    out = x.new_empty(r.num_assignments, h)
    _launch(inter, w2, s2, out, r, (h, i), gated=False)
    return out.view(t, r.top_k, h).sum(dim=1)


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    out: torch.Tensor,
    r: Routed,
    nk: tuple[int, int],
    gated: bool,
) -> None:
    """One grouped GEMM: out = a rows @ w[e]^T with gated's epilogue, N outputs, K inputs (`nk`)."""
    tt = r.tiles
    block_n = tt.gate_up_n if gated else tt.down_n
    grid = (r.block_expert.numel(), triton.cdiv(nk[0], block_n))
    _moe_quant_kernel[grid](
        a, w, s, out, r.sorted_ids, r.block_expert, r.weights, r.num_assignments, nk[0], nk[1],
        a.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1), out.stride(0),
        TOP_K=r.top_k, GATED=gated, INT4=s.dim() == 3, GROUP=GROUP,
        BLOCK_M=tt.block_m, BLOCK_N=block_n, BLOCK_K=tt.block_k,
        DOT_PRECISION=r.precision, num_warps=tt.num_warps, num_stages=tt.num_stages,
    )  # fmt: skip

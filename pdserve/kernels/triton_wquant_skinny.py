"""The decode-rows GEMM for quantized weights: y = x @ W^T for a few rows of x (M <= 128), W as wint8,
wint4 or fp8 (layers/quant.py's layout), streamed once from memory and dequantized in registers.

Each program owns BLOCK_N output rows of W and one span of K (a multiple of wint4's group), so that
the grid fills the SMs even where N / BLOCK_N does not (down_proj: N 3584, K 18944). A step of K
loads the weight tile [BLOCK_N, BLOCK_K] and converts it to x's dtype:

    wint8   int8 -> x's dtype (exact: |w| <= 127); the row scale once, on the partial sum
    fp8     e4m3 -> x's dtype (exact: e4m3 fits bf16 / fp16); the row scale once, as wint8; x is not
            quantized (weight-only: no activation quantizer launch at decode)
    wint4   bytes [BN, BK/2]: low nibble = even k, high = odd k (sign-extended); tl.interleave of the
            two gives the [BN, BK] tile in k order, so ONE dot runs against a contiguous x tile;
            BK divides 128, so one group's scale per step, applied to the step's partial product

The product of a step is the weight tile times x^T ([BN, BK] @ [BK, BM] -> [BN, BM]): the dequantized
tile is the dot's left operand, straight from registers (wgmma takes it so on Hopper), and x (rows
padded to 16) the small right one. At one row (DOT off) no tensor cores: w * x summed along K,
which skips the padding and the operand shuffle. PREFETCH: the next step's weight bytes are loaded
a step ahead into registers, where Triton's pipeliner does not stage them itself (plan.prefetch).

K split in several spans (PARTIALS): each span writes float32 partials [spans, M, N] and a second
launch sums them in span order (no atomics: the result does not depend on scheduling), adds the bias
and casts; one span stores y directly. The tiles are triton_wquant_plan.plan()'s.

This module imports triton: only the kernel factory (through triton_wquant_choice.py) imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.triton_wquant import convert_tile, convert_tile_f32, raw_tile
from pdserve.kernels.triton_wquant_plan import FORMATS, GROUP, SkinnyPlan


@triton.jit
def _dot_span(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, s_ptr, n, n_ok, M, k_start, k_end, stride_xm, stride_wn, stride_sn,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """sum over k in [k_start, k_end) of W[n, k] * x[m, k] as [BLOCK_N, BLOCK_M] float32, scaled."""
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PREFETCH:
        ahead = raw_tile(w_ptr, n, n_ok, k_start, k_end, stride_wn, FMT, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + m[:, None] * stride_xm + k[None, :],
            mask=(m < M)[:, None] & (k < k_end)[None, :],
            other=0.0,
        )
        if PREFETCH:  # the next step's weight loads in flight while this step's are used
            raw = ahead
            ahead = raw_tile(w_ptr, n, n_ok, k0 + BLOCK_K, k_end, stride_wn, FMT, BLOCK_K)
        else:
            raw = raw_tile(w_ptr, n, n_ok, k0, k_end, stride_wn, FMT, BLOCK_K)
        w = convert_tile(raw, FMT, x_ptr.dtype.element_ty)
        part = tl.dot(w, tl.trans(x), input_precision=PRECISION)
        if FMT == 1:
            acc += part * tl.load(s_ptr + n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)[:, None]
        else:
            acc += part
    if FMT != 1:
        acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[:, None]
    return acc


@triton.jit
def _gemv_span(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, s_ptr, n, n_ok, k_start, k_end, stride_wn, stride_sn,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """_dot_span for one row of x, on the CUDA cores: [BLOCK_N] float32, scaled."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        ahead = raw_tile(w_ptr, n, n_ok, k_start, k_end, stride_wn, FMT, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k, mask=k < k_end, other=0.0).to(tl.float32)
        if PREFETCH:
            raw = ahead
            ahead = raw_tile(w_ptr, n, n_ok, k0 + BLOCK_K, k_end, stride_wn, FMT, BLOCK_K)
        else:
            raw = raw_tile(w_ptr, n, n_ok, k0, k_end, stride_wn, FMT, BLOCK_K)
        w = convert_tile_f32(raw, FMT)
        part = tl.sum(w * x[None, :], axis=1)
        if FMT == 1:
            acc += part * tl.load(s_ptr + n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
        else:
            acc += part
    if FMT != 1:
        acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)
    return acc


@triton.jit
def _wq_skinny_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, K_SPAN, stride_xm, stride_wn, stride_sn, stride_ym,
    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """Program (n block, K span): stores y (+ bias) in y's dtype; PARTIALS (K split in several spans):
    float32 partials at y_ptr [spans, M, N] for _reduce_kernel instead."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k_start = tl.program_id(1) * K_SPAN
    k_end = tl.minimum(k_start + K_SPAN, K)
    if DOT:
        acc = _dot_span(
            x_ptr, w_ptr, s_ptr, n, n_ok, M, k_start, k_end, stride_xm, stride_wn, stride_sn,
            FMT, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, PREFETCH,
        )  # fmt: skip
        m = tl.arange(0, BLOCK_M)
        mask = n_ok[:, None] & (m < M)[None, :]
        if not PARTIALS:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            rows = tl.program_id(1) * M + m
            tl.store(y_ptr + rows[None, :] * N + n[:, None], acc, mask=mask)
    else:
        acc = _gemv_span(
            x_ptr, w_ptr, s_ptr, n, n_ok, k_start, k_end, stride_wn, stride_sn, FMT, GROUP, BLOCK_N, BLOCK_K,
            PREFETCH,
        )  # fmt: skip
        if not PARTIALS:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(y_ptr + tl.program_id(1) * N + n, acc, mask=n_ok)


@triton.jit
def _reduce_kernel(  # type: ignore[no-untyped-def]
    p_ptr, b_ptr, y_ptr, M, N, SPLIT, stride_ym, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """y[m, n] = sum over s of partials[s, m, n] (s in order) (+ bias), in y's dtype."""
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ptr + (s * M + m) * N + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def wq_skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    fmt: str,
    plan: SkinnyPlan,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (contiguous along K) @ W^T (+ bias) -> [M, N] in x's dtype, W `fmt`'s data and scale
    (layers/quant.py), in plan's tiles."""
    (m, k), n = x.shape, weight.shape[0]
    code = FORMATS.index(fmt)
    assert x.stride(1) == 1 and weight.stride(1) == 1
    assert weight.shape[1] == (k // 2 if fmt == "wint4" else k)
    assert plan.span % GROUP == 0 and (fmt != "wint4" or GROUP % plan.block_k == 0) and (plan.dot or m <= 1)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    split = -(-k // plan.span)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32: exact products, not tf32
    _wq_skinny_kernel[(triton.cdiv(n, plan.block_n), split)](
        x, weight, scale, scale if bias is None else bias, out, m, n, k, plan.span,
        x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
        FMT=code, GROUP=GROUP, HAS_BIAS=bias is not None and split == 1, PARTIALS=split > 1, DOT=plan.dot,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        PRECISION=precision, PREFETCH=plan.prefetch, num_warps=plan.warps, num_stages=plan.stages,
    )  # fmt: skip
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _reduce_kernel[(triton.cdiv(n, block), m)](
            out, scale if bias is None else bias, y, m, n, split, y.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return y

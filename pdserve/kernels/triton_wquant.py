"""Weight-only quantized GEMM in Triton: y = x @ W^T with W held as int8 (wint8, a scale per output row)
or packed int4 (wint4, a scale per row and group of 128 inputs), dequantized in registers.

The weight crosses memory at 1 or 1/2 byte an element, which is the whole point at decode (a step
streams every weight once). Each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K:

    wint8   w int8 [BN, BK] -> x's dtype (exact: |w| <= 127) -> tl.dot; the row scale after the loop
    wint4   bytes int8 [BN, BK/2]: (b << 4) >> 4 = the even k, b >> 4 = the odd k (sign-extended);
            two dots against x's even and odd columns; BK divides 128, so one group's scale per step,
            applied to that step's partial product

One kernel for decode rows (BLOCK_M 16, narrow N tiles so that a few rows still fill the SMs) and
prefill tiles (BLOCK_M 64/128). The layout of the quantized weights is layers/quant.py's. This module
imports triton: only the kernel factory (factory.py) imports it, when Triton is chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.sm_count import num_sms

GROUP = 128  # wint4 inputs per scale (layers/quant.py WINT4_GROUP)
Tile = tuple[int, int, int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


@triton.jit
def _wquant_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    if INT4:
        for k0 in range(0, K, BLOCK_K):
            j = k0 // 2 + tl.arange(0, HALF)  # bytes of this step; even k = 2j, odd k = 2j + 1
            even = 2 * j
            b_mask = n_ok[:, None] & (even < K)[None, :]
            b = tl.load(w_ptr + n[:, None] * stride_wn + j[None, :], mask=b_mask, other=0)
            lo = ((b << 4).to(tl.int8) >> 4).to(x_ptr.dtype.element_ty)  # int8 wrap, whatever the promotion
            hi = (b >> 4).to(x_ptr.dtype.element_ty)
            x_row = x_ptr + m[:, None] * stride_xm
            xe = tl.load(x_row + even[None, :], mask=m_ok[:, None] & (even < K)[None, :], other=0.0)
            xo = tl.load(x_row + even[None, :] + 1, mask=m_ok[:, None] & (even + 1 < K)[None, :], other=0.0)
            part = tl.dot(xe, tl.trans(lo), input_precision=PRECISION)
            part += tl.dot(xo, tl.trans(hi), input_precision=PRECISION)
            s = tl.load(s_ptr + n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
            acc += part * s[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w_mask, x_mask = n_ok[:, None] & (k < K)[None, :], m_ok[:, None] & (k < K)[None, :]
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=w_mask, other=0)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), input_precision=PRECISION)
        acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def choose_tile(m: int, n: int, sms: int) -> Tile:
    """The tile for M rows of x and N outputs on `sms` SMs: at decode sizes the widest N tile whose
    grid still fills every SM once (narrower tiles re-read x, which is tiny there); prefill tiles past
    64 rows."""
    if m > 64:
        return (128, 128, 64, 8, 3)
    block_m = 16 if m <= 16 else 64
    block_n = next((w for w in (128, 64, 32) if -(-n // w) >= sms), 16)
    return (block_m, block_n, 128 if m <= 16 else 64, 4, 4)


def wquant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: Tile | None = None,
) -> torch.Tensor:
    """x [.., K] @ W^T (+ bias) -> [.., N] in x's dtype (fp32 accumulation). `scale` [N]: `weight` is
    int8 [N, K]; `scale` [N, ceil(K/128)]: `weight` is packed int4 [N, K/2]."""
    int4 = scale.dim() == 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    (mrows, k), n = rows.shape, weight.shape[0]
    assert weight.shape[1] == (k // 2 if int4 else k) and weight.stride(1) == 1
    assert not int4 or scale.shape[1] == -(-k // GROUP)
    y = torch.empty((mrows, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = tile or choose_tile(mrows, n, num_sms(x.device))
    grid = (triton.cdiv(n, block_n), triton.cdiv(mrows, block_m))
    _wquant_kernel[grid](
        rows, weight, scale, scale if bias is None else bias, y, mrows, n, k,
        rows.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
        INT4=int4, GROUP=GROUP, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32: exact products, not tf32
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)

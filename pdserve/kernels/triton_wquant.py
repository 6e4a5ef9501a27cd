"""Weight-only quantized GEMM tiles in Triton: y = x @ W^T with W held as int8 (wint8, a scale per output
row) or packed int4 (wint4, a scale per row and group of 128 inputs), dequantized in registers; and
the one-launch dequantization of a whole weight (for prefill, then cuBLAS).

Each program of the tile kernel owns a [BLOCK_M, BLOCK_N] tile of y and walks K; weight_tile (shared
with triton_wquant_skinny.py) converts a step's weight tile to x's dtype:

    wint8   w int8 [BN, BK] -> x's dtype (exact: |w| <= 127) -> tl.dot; the row scale after the loop
    wint4   bytes int8 [BN, BK/2]: (b << 4) >> 4 = the even k, b >> 4 = the odd k (sign-extended);
            tl.interleave(even, odd) is the [BN, BK] tile in k order, so ONE dot against a contiguous
            x tile; BK divides 128, so one group's scale per step, applied to the step's product

Which rows take this kernel, the skinny one or the dequantize-then-cuBLAS path is
triton_wquant_plan.route's choice (triton_wquant_choice.py applies it). The layout of the quantized
weights is layers/quant.py's. This module imports triton: only the kernel factory imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.sm_count import num_sms
from pdserve.kernels.triton_wquant_plan import FORMATS, GROUP

Tile = tuple[int, int, int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


@triton.jit
def raw_tile(w_ptr, n, n_ok, k0, k_end, stride_wn, FMT: tl.constexpr, BLOCK_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """The stored bytes of W[n, k0 : k0 + BLOCK_K]: [len(n), BLOCK_K] int8 / e4m3, or for packed int4
    (FMT 1) [len(n), BLOCK_K / 2] bytes; zero past k_end or N. FMT: triton_wquant_plan.FORMATS'
    index (0 int8, 1 packed int4, 2 e4m3)."""
    if FMT == 1:  # byte j holds k = 2j (low nibble) and k = 2j + 1 (high)
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = n_ok[:, None] & (2 * j < k_end)[None, :]
        return tl.load(w_ptr + n[:, None] * stride_wn + j[None, :], mask=mask, other=0)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (k < k_end)[None, :]
        return tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=mask, other=0.0 if FMT == 2 else 0)


@triton.jit
def convert_tile(raw, FMT: tl.constexpr, dtype):  # type: ignore[no-untyped-def]
    """raw_tile's bytes as values in `dtype` [len(n), BLOCK_K], in k order, unscaled: the integer
    formats through convert_tile_f32 (no int -> float instructions), then float32 -> dtype (exact,
    two a instruction), e4m3 straight."""
    if FMT == 2:
        return raw.to(dtype)
    else:
        return convert_tile_f32(raw, FMT).to(dtype)


@triton.jit
def convert_tile_f32(raw, FMT: tl.constexpr):  # type: ignore[no-untyped-def]
    """convert_tile to float32 without int -> float conversion instructions (their throughput, 16 a
    clock per SM, is below what streaming int4 at full bandwidth needs): an integer u in [0, 2^23) or'd
    into the bits of 2^23 is the float 2^23 + u, exactly; u = w + 8 (int4) or w + 128 (int8), then one
    float subtraction. e4m3 converts in hardware (two a time)."""
    if FMT == 2:  # (one return per branch: Triton compiles what follows a constexpr branch's return)
        return raw.to(tl.float32)
    elif FMT == 1:
        bits = raw.to(tl.int32)  # sign-extended
        lo = (bits & 0xF) ^ 8  # the low nibble's two's complement value + 8
        hi = ((bits >> 4) & 0xF) ^ 8
        lo_f = (lo | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
        hi_f = (hi | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        return tl.interleave(lo_f, hi_f)
    else:
        bits = raw.to(tl.int32)
        return ((bits + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128


@triton.jit
def weight_tile(w_ptr, n, n_ok, k0, k_end, stride_wn, FMT: tl.constexpr, BLOCK_K: tl.constexpr, dtype):  # type: ignore[no-untyped-def]
    """W[n, k0 : k0 + BLOCK_K] as [len(n), BLOCK_K] in `dtype`, zero past k_end or N, unscaled."""
    return convert_tile(raw_tile(w_ptr, n, n_ok, k0, k_end, stride_wn, FMT, BLOCK_K), FMT, dtype)


@triton.jit
def _wquant_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0
        )
        w = weight_tile(w_ptr, n, n_ok, k0, K, stride_wn, FMT, BLOCK_K, x_ptr.dtype.element_ty)
        part = tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if FMT == 1:  # BLOCK_K divides GROUP: this step's inputs share one scale
            acc += part * tl.load(s_ptr + n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)[None, :]
        else:
            acc += part
    if FMT != 1:
        acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(  # type: ignore[no-untyped-def]
    w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[n, k] = W[n, k] * scale (layers/quant.py dequantize, float32 math) in out's dtype."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = n < N, k < K
    w = weight_tile(w_ptr, n, n_ok, tl.program_id(1) * BLOCK_K, K, stride_wn, FMT, BLOCK_K, tl.float32)
    if FMT == 1:
        s = tl.load(
            s_ptr + n[:, None] * stride_sn + (k // GROUP)[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
    else:
        s = tl.load(s_ptr + n, mask=n_ok, other=0.0)[:, None]
    mask = n_ok[:, None] & k_ok[None, :]
    tl.store(out_ptr + n[:, None] * stride_on + k[None, :], (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, fmt: str, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """The float weight [N, K] in `dtype` that `fmt`'s data and scale stand for, in one launch."""
    n = weight.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    block_n, block_k = 32, 256
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        weight, scale, out, n, k, weight.stride(0), scale.stride(0), out.stride(0),
        FMT=FORMATS.index(fmt), GROUP=GROUP, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


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
        FMT=1 if int4 else 0, GROUP=GROUP, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32: exact products, not tf32
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)

"""Rotary position embedding for q and k in one Triton launch, in place (the CUDA hot path); and the
same fused with writing the step's K/V into the paged cache (rotary_store_kv), optionally after
Qwen3's per-head RMSNorm of q and k (one launch a layer where the norms took four: a copy of the
strided view and a norm each).

The torch code (rotary.py) costs five kernels for q and five for k per layer (two products, a
negation, a concatenation, a sum): ~640 launches per decode step of a 64-layer model. This kernel
reads each token's position, its cos/sin row (the first half: the table repeats it), and rotates every
head of q and k in fp32, rounding once to the input dtype.

This module imports triton: only the kernel factory (factory.py) imports it, when Triton is chosen,
so a CPU process never does unless a test sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.pdl import ALWAYS, Pdl, launch_options
from pdserve.kernels.triton_pdl import wait_prior

QKNorm = tuple[torch.Tensor, torch.Tensor, float]  # q's and k's RMSNorm weights [head_dim], eps


@triton.jit
def _rms_normed(x1, x2, w_ptr, eps, dims, like_ptr, HALF: tl.constexpr):  # type: ignore[no-untyped-def]
    """Each head (row) RMS-normalized over its 2 * HALF dims and scaled by w, rounded to
    like_ptr's dtype where RMSNorm rounds (the normalized value, then its product with w)."""
    dtype = like_ptr.dtype.element_ty
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x1, (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _rotated(  # type: ignore[no-untyped-def]
    base, heads, dims, mask, stride_h, c, s, w_ptr, eps, HALF: tl.constexpr, NORM: tl.constexpr
):
    """Both halves of every head at base, (RMS-normalized by w first if NORM, then) rotated in
    fp32: ([H, HALF], [H, HALF])."""
    offs = heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _rms_normed(x1, x2, w_ptr, eps, dims, base, HALF)
    return x1 * c[None, :] - x2 * s[None, :], x2 * c[None, :] + x1 * s[None, :]


@triton.jit
def _rotate_heads(  # type: ignore[no-untyped-def]
    base, heads, dims, dmask, stride_h, c, s, w_ptr, eps, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
    NORM: tl.constexpr,
):  # fmt: skip
    mask = (heads[:, None] < NUM_HEADS) & dmask[None, :]
    out1, out2 = _rotated(base, heads, dims, mask, stride_h, c, s, w_ptr, eps, HALF, NORM)
    offs = heads[:, None] * stride_h + dims[None, :]
    tl.store(base + offs, out1.to(base.dtype.element_ty), mask=mask)
    tl.store(base + offs + HALF, out2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_table, dims, dmask):  # type: ignore[no-untyped-def]
    """The token's cos/sin at `dims` (the table's first half: its halves repeat), in fp32."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_table + dims, mask=dmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_table + dims, mask=dmask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    c, s = cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_table, dims, dmask)
    heads = tl.arange(0, BLOCK_H)
    q_base, k_base = q_ptr + token * stride_qt, k_ptr + token * stride_kt
    _rotate_heads(q_base, heads, dims, dmask, stride_qh, c, s, q_base, 0.0, NUM_Q_HEADS, HALF, False)
    _rotate_heads(k_base, heads, dims, dmask, stride_kh, c, s, k_base, 0.0, NUM_K_HEADS, HALF, False)


@triton.jit
def _rotary_store_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, cache_ptr, qw_ptr, kw_ptr, eps,
    k_inv_scale, v_inv_scale,  # the pool stores K / k_scale, V / v_scale (engine/kv_scales.py)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    stride_kv, stride_cb, stride_ct, stride_ch,  # cache: K to V, block, token, head
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, NORM: tl.constexpr = False,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """q (RMS-normalized by qw if NORM, then) rotated in place; k (normalized by kw, then) rotated
    and v copied straight into the cache at the token's slot (negative: a padded token, nothing
    written). k itself is left as it was."""
    wait_prior(PDL)
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    c, s = cos_sin(pos_ptr, cos_ptr, sin_ptr, token, stride_table, dims, dmask)
    heads = tl.arange(0, BLOCK_H)
    q_base = q_ptr + token * stride_qt
    _rotate_heads(q_base, heads, dims, dmask, stride_qh, c, s, qw_ptr, eps, NUM_Q_HEADS, HALF, NORM)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    mask = (heads[:, None] < NUM_K_HEADS) & dmask[None, :] & (slot >= 0)
    k1, k2 = _rotated(k_ptr + token * stride_kt, heads, dims, mask, stride_kh, c, s, kw_ptr, eps, HALF, NORM)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    dst += heads[:, None] * stride_ch + dims[None, :]
    dtype = cache_ptr.dtype.element_ty
    tl.store(dst, (k1 * k_inv_scale).to(dtype), mask=mask)
    tl.store(dst + HALF, (k2 * k_inv_scale).to(dtype), mask=mask)
    src = v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    v1, v2 = tl.load(src, mask=mask).to(tl.float32), tl.load(src + HALF, mask=mask).to(tl.float32)
    tl.store(dst + stride_kv, (v1 * v_inv_scale).to(dtype), mask=mask)
    tl.store(dst + stride_kv + HALF, (v2 * v_inv_scale).to(dtype), mask=mask)


def triton_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by cos/sin [max_positions, D] at `positions`."""
    tokens, num_q, head_dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](
            q,
            k,
            positions,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            NUM_Q_HEADS=num_q,
            NUM_K_HEADS=k.shape[1],
            HALF=half,
            BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q, k


def rotary_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,  # [T, Hq, D]: rotated in place
    k: torch.Tensor,  # [T, Hk, D]: read; its rotation goes to the cache only
    v: torch.Tensor,  # [T, Hk, D]
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hk, D], strided; head_dim contiguous
    slot_mapping: torch.Tensor,  # [T]; negative: skip
    norms: QKNorm | None = None,
    pdl: Pdl = ALWAYS,
    k_scale: float = 1.0,  # the pool holds K / k_scale, V / v_scale
    v_scale: float = 1.0,
) -> None:
    """Rotary and the KV-cache write in one launch (one per layer instead of two); with `norms`,
    q and k RMS-normalized per head first (Qwen3), in the same launch."""
    tokens, num_q, head_dim = q.shape
    assert all(x.stride(-1) == 1 for x in (q, k, v, cos, kv_cache)) and cos.stride() == sin.stride()
    if not tokens:
        return
    qw, kw, eps = norms if norms is not None else (q, q, 0.0)
    _rotary_store_kernel[(tokens,)](
        q, k, v, positions, cos, sin, slot_mapping, kv_cache, qw, kw, eps, 1.0 / k_scale, 1.0 / v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_Q_HEADS=num_q, NUM_K_HEADS=k.shape[1], HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=kv_cache.shape[2],
        NORM=norms is not None, num_warps=4, **launch_options(q, pdl),
    )  # fmt: skip

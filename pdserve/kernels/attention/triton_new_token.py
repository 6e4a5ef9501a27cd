"""The step's own token inside the decode kernel: rotary (after Qwen3's q/k norms), the KV-cache write
and its attention, done by the decode program instead of a launch before it.

On a decode-only step the rotary + cache-write kernel (kernels/triton_rotary.py) is a launch a layer
between the qkv GEMM and decode attention, ~3 us at 128 rows. With `NewToken` given, paged_decode's
split kernel instead loads q and rotates it itself, and the one program per (sequence, kv head)
whose partition ends at the sequence's last position rotates that token's k, writes k and v into the
cache at its slot, and folds the new key into its online softmax from registers rather than reading
it back (no program reads a position another program of the same launch writes). The arithmetic is
triton_rotary's: the same fp32 products, q and k rounded where that kernel rounds them.

On by default on decode-only steps, where it saves a launch a layer at every batch size measured
(docs/performance.md); `KernelConfig.decode_rotary=off` keeps the rotary launch. NewToken, what the
kernel is handed, is in new_token.py (no triton there).
This module imports triton: import it only where Triton is chosen (the kernel factory).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def roped(ptrs, mask, dims, c, s, w_ptr, eps, HALF: tl.constexpr, NORM: tl.constexpr):  # type: ignore[no-untyped-def]
    """The rows at ptrs ([..., BLOCK_D], dims contiguous: one head a row), RMS-normalized by w first if
    NORM (rounded where RMSNorm rounds), then rotated (dim d with its partner d +- HALF), in fp32."""
    first = dims < HALF
    shift = tl.where(first, HALF, -HALF)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(ptrs + shift, mask=mask, other=0.0).to(tl.float32)  # each dim's partner
    if NORM:
        dtype = ptrs.dtype.element_ty
        rstd = tl.rsqrt(tl.sum(x * x, axis=-1, keep_dims=True) / (2 * HALF) + eps)
        on = dims < 2 * HALF
        wx = tl.load(w_ptr + dims, mask=on, other=0.0).to(tl.float32)
        wy = tl.load(w_ptr + dims + shift, mask=on, other=0.0).to(tl.float32)
        x = (wx * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        y = (wy * (y * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return tl.where(first, x * c - y * s, x * c + y * s)


@triton.jit
def store_and_attend(  # type: ignore[no-untyped-def]
    q,  # [BLOCK_G, BLOCK_D], rotated, in q's dtype
    k_ptr, v_ptr, slot_ptr, kw_ptr, eps, k_inv_scale, v_inv_scale,  # the pool: K / k_scale, V / v_scale
    cache_ptr, stride_kv, stride_cb, stride_ct, head_offset, seq, kv_head,
    stride_kt, stride_kh, stride_vt, stride_vh, c, s, dims, dim_mask, holds,
    acc, m_i, l_i, scale_log2, BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """With `holds` (this program's partition ends at the new token): the token's k (normalized,)
    rotated and its v written to the cache at its slot, and its key folded into (acc, m_i, l_i) as
    online_softmax_step folds a tile; without, the running state unchanged. The fold is written out for
    one key: sharing triton_tile's as a [BLOCK_G, 1] tile compiled to 148 registers instead of 116."""
    k_mask = dim_mask & holds
    k_ptrs = k_ptr + seq * stride_kt + kv_head * stride_kh + dims
    k = roped(k_ptrs, k_mask, dims, c, s, kw_ptr, eps, HALF, NORM)
    k = (k * k_inv_scale).to(cache_ptr.dtype.element_ty)  # as the cache holds it: k_scale is in scale_log2
    v = tl.load(v_ptr + seq * stride_vt + kv_head * stride_vh + dims, mask=k_mask, other=0.0)
    v = (v.to(tl.float32) * v_inv_scale).to(cache_ptr.dtype.element_ty)  # v_scale: the output's
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + head_offset + dims
    tl.store(dst, k, mask=k_mask & (slot >= 0))
    tl.store(dst + stride_kv, v, mask=k_mask & (slot >= 0))
    score = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * scale_log2  # [BLOCK_G]
    score = tl.where(holds, score, float("-inf"))
    m_new = tl.maximum(m_i, score)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(score - m_safe)
    alpha = tl.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + p.to(q.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    return acc, m_new, l_i * alpha + p

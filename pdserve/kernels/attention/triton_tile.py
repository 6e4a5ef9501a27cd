"""The inner step shared by the Triton attention kernels: one K/V tile, read through a block table.

A tile is BLOCK_N consecutive token positions of one sequence. Each position's block id comes from the
sequence's block table, so a tile may span pages (any power-of-two block_size works):

    key address = block_table[pos // block_size] * stride_block + (pos % block_size) * stride_token
                  + kv_head * stride_head + dim

`online_softmax_step` folds one tile's scores into the running (max, sum, accumulator) of each query
row, in base 2 (scores are multiplied by scale * log2(e), so exp2 is the exponential), with fp32
accumulation.
This module imports triton: import it only where Triton is chosen (the kernel factory).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(  # type: ignore[no-untyped-def]
    cache_ptr,
    block_table_ptr,  # this sequence's row of the block table
    pos,  # [BLOCK_N] token positions
    valid,  # [BLOCK_N] positions to read; others come back as 0
    head_offset,  # kv_head * stride_head
    dims,  # [BLOCK_D]
    dim_mask,  # [BLOCK_D]
    stride_cb,
    stride_ct,
    BLOCK_SIZE: tl.constexpr,
):
    blocks = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = blocks * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head_offset  # [BLOCK_N]
    mask = valid[:, None] & dim_mask[None, :]
    return tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0)  # [BLOCK_N, BLOCK_D]


@triton.jit
def online_softmax_step(  # type: ignore[no-untyped-def]
    q,  # [R, BLOCK_D]
    k,  # [BLOCK_N, BLOCK_D]
    v,  # [BLOCK_N, BLOCK_D]
    visible,  # bool, broadcastable to [R, BLOCK_N]
    acc,  # [R, BLOCK_D] fp32
    m_i,  # [R] fp32 running max (base-2 scaled scores)
    l_i,  # [R] fp32 running sum of exp2(score - max)
    scale_log2,
    DOT_PRECISION: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [R, BLOCK_N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_tile(  # type: ignore[no-untyped-def]
    q,
    cache_ptr,  # K; V is stride_kv further
    stride_kv,
    table,
    pos,
    valid,  # [BLOCK_N] positions to read
    visible,  # bool, broadcastable to [R, BLOCK_N]: which (query, key) pairs count
    head_offset,
    dims,
    dim_mask,
    stride_cb,
    stride_ct,
    acc,
    m_i,
    l_i,
    scale_log2,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Read one K/V tile through the block table and fold it into (acc, m_i, l_i)."""
    k = load_kv_tile(
        cache_ptr, table, pos, valid, head_offset, dims, dim_mask, stride_cb, stride_ct, BLOCK_SIZE
    ).to(q.dtype)  # an fp8 pool (--kv-cache-dtype fp8) is widened here; else a no-op
    v_ptr = cache_ptr + stride_kv
    v = load_kv_tile(v_ptr, table, pos, valid, head_offset, dims, dim_mask, stride_cb, stride_ct, BLOCK_SIZE)
    v = v.to(q.dtype)
    return online_softmax_step(q, k, v, visible, acc, m_i, l_i, scale_log2, DOT_PRECISION)


def dot_precision(dtype_is_fp32: bool) -> str:
    """fp32 inputs get exact fp32 products (ieee) rather than Triton's default tf32."""
    return "ieee" if dtype_is_fp32 else "tf32"


def pow2(n: int) -> int:
    return int(triton.next_power_of_2(n))

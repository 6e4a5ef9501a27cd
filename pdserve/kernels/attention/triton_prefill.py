"""Paged prefill attention in Triton: variable-length query chunks over a cached prefix, causal.

Sequence i has q_len = query_start_loc[i+1] - query_start_loc[i] new tokens and ctx_len = seq_lens[i]
tokens of context (its cached prefix plus this chunk, already in the cache). Query j of the chunk sits
at position p = ctx_len - q_len + j and sees keys 0..p, all read through the block table:

    keys:    [ 0 ............ prefix + m_start | ...... diagonal tiles ...... ]
              every row of the tile sees these   masked key <= query position

One program per (tile of BLOCK_M queries of one sequence, query head); a flat tile index is mapped to
its sequence by binary search over query_start_loc, so the grid is known from the token and sequence
counts alone: sequence i owns tiles from (query_start_loc[i] - base) // BLOCK_M + i onwards.
This module imports triton: import it only where Triton is chosen (the kernel factory).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention.triton_tile import attend_tile, dot_precision, pow2
from pdserve.kernels.tuning.tables import AttentionTiles

LOG2E = math.log2(math.e)


@triton.jit
def _find_sequence(query_start_ptr, tile_id, num_seqs, token_base, BLOCK_M: tl.constexpr):  # type: ignore[no-untyped-def]
    """The last sequence whose first tile index is <= tile_id."""
    lo = tile_id * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = (tl.load(query_start_ptr + mid).to(tl.int32) - token_base) // BLOCK_M + mid
        lo = tl.where(first_tile <= tile_id, mid, lo)
        hi = tl.where(first_tile <= tile_id, hi, mid - 1)
    return lo


# Per-step integers, and the alignment of the tables sliced past the decode rows, are not specialized
# on: Triton would compile again when an integer turns 1 or a multiple of 16, or a slice's address does.
@triton.jit(
    do_not_specialize=["num_seqs", "token_base", "stride_bt"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "query_start_ptr"],
)
def _prefill_kernel(  # type: ignore[no-untyped-def]
    q_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale_log2, num_seqs,
    token_base, v_scale,  # the pool holds V / v_scale (and K / k_scale: folded into scale_log2)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_cb, stride_ct, stride_ch,  # cache strides: K to V, block, token, head
    stride_bt,
    QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile_id = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_sequence(query_start_ptr, tile_id, num_seqs, token_base, BLOCK_M)
    q_begin = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_begin
    m_start = (tile_id - (q_begin - token_base) // BLOCK_M - seq) * BLOCK_M
    if m_start >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = ctx_len - q_len

    rows = m_start + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    q_pos = prefix + rows  # [BLOCK_M] position of each query in its sequence
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    io_mask = row_valid[:, None] & dim_mask[None, :]
    tokens = (q_begin + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=io_mask, other=0.0
    )

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = (head // QUERY_GROUP) * stride_ch
    full_end = (prefix + m_start) // BLOCK_N * BLOCK_N  # keys before this every row of the tile sees
    for tile_start in range(0, full_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < full_end
        acc, m_i, l_i = attend_tile(
            q, cache_ptr, stride_kv, table, pos, valid, valid[None, :], head_offset, dims, dim_mask,
            stride_cb, stride_ct, acc, m_i, l_i, scale_log2, BLOCK_SIZE, DOT_PRECISION,
        )  # fmt: skip
    causal_end = tl.minimum(prefix + m_start + BLOCK_M, ctx_len)
    for tile_start in range(full_end, causal_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < causal_end
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        acc, m_i, l_i = attend_tile(
            q, cache_ptr, stride_kv, table, pos, valid, visible, head_offset, dims, dim_mask,
            stride_cb, stride_ct, acc, m_i, l_i, scale_log2, BLOCK_SIZE, DOT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None] * v_scale  # exact for a pool of scale 1
    o_ptrs = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill(
    q: torch.Tensor,  # [T, num_heads, D]: all of the step"s tokens
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, D]
    block_tables: torch.Tensor,  # [P, max_blocks]: the prefill sequences" rows
    seq_lens: torch.Tensor,  # [P]
    query_start_loc: torch.Tensor,  # [P + 1]: offsets into q"s tokens (absolute)
    out: torch.Tensor,  # [T, num_heads, D]; the prefill rows are written
    scale: float,
    token_base: int,  # query_start_loc[0]: the first prefill token
    num_tokens: int,  # query_start_loc[P] - token_base (an upper bound is fine)
    tiles: AttentionTiles,  # the tuning's
    k_scale: float = 1.0,  # the pool holds K / k_scale, V / v_scale (engine/kv_scales.py)
    v_scale: float = 1.0,
) -> None:
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_m, block_n, num_warps, num_stages = tiles.prefill_tile(q.dtype, head_dim)
    grid = (num_tokens // block_m + num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        kv_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * k_scale * LOG2E,
        num_seqs,
        token_base,
        v_scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        QUERY_GROUP=num_heads // kv_cache.shape[3],
        HEAD_DIM=head_dim,
        BLOCK_D=pow2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_SIZE=kv_cache.shape[2],
        DOT_PRECISION=dot_precision(q.dtype == torch.float32),
        num_warps=num_warps,
        num_stages=num_stages,
    )

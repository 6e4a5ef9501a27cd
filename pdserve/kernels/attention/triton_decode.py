"""Paged decode attention in Triton: one query token per sequence, split-K over long contexts.

Flash-decoding: each sequence's context is cut into `num_splits` partitions of whole tiles; one program
per (sequence, kv head, partition) attends all query heads of that kv head's group (GQA rows packed
into one tensor-core tile) and writes a partial output and its log-sum-exp; a reduce kernel merges the
partitions. With one partition the first kernel writes the output directly.

    grid (batch, kv_heads, splits) -> part_out [batch, heads, splits, D], part_lse [batch, heads, splits]
    grid (batch, heads)            -> out [batch, heads, D]

Given a `NewToken` (triton_new_token.py), the split kernel also does the step's rotary and KV-cache
write: q comes unrotated, and the new token's key and value are stored and attended from registers.

Only tensors are read on the device, the grid depends on the batch size and `num_splits` alone, and a
sequence of length 0 (a padded batch entry) gets zeros: a decode step can be captured in a CUDA graph.
This module imports triton: import it only where Triton is chosen (the kernel factory).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention.new_token import NewToken, kernel_args
from pdserve.kernels.attention.triton_new_token import roped, store_and_attend
from pdserve.kernels.attention.triton_tile import attend_tile, dot_precision, pow2
from pdserve.kernels.pdl import ALWAYS, Pdl, launch_options
from pdserve.kernels.sm_count import num_sms
from pdserve.kernels.triton_pdl import wait_prior
from pdserve.kernels.triton_rotary import cos_sin
from pdserve.kernels.tuning.tables import AttentionTiles

LOG2E = math.log2(math.e)


@triton.jit(do_not_specialize=["num_splits", "stride_bt", "stride_pb", "stride_ph", "stride_ps"])
def _decode_split_kernel(  # type: ignore[no-untyped-def]
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, scale_log2,
    v_scale,  # the pool holds V / v_scale: each partition's output is multiplied back (K's: in scale_log2)
    num_splits, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_cb, stride_ct, stride_ch,  # cache strides: K to V, block, token, head
    stride_bt,
    stride_pb, stride_ph, stride_ps,  # part_out: batch, head, split (dim contiguous); part_lse [b, h, s]
    k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, qw_ptr, kw_ptr, eps,  # NEW_TOKEN: triton_new_token
    k_inv_scale, v_inv_scale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEW_TOKEN: tl.constexpr = False, HALF: tl.constexpr = 1, NORM: tl.constexpr = False,
    PDL: tl.constexpr = False,
):  # fmt: skip
    wait_prior(PDL)
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, start, end = _partition(seq_lens_ptr, seq, split, num_splits, BLOCK_N)

    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * QUERY_GROUP + rows  # [BLOCK_G]: the query heads sharing this kv head
    row_mask = rows < QUERY_GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    io_mask = row_mask[:, None] & dim_mask[None, :]
    q_ptrs = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    if NEW_TOKEN:  # q (normalized,) rotated here; the new token's key comes from registers below
        c, s = cos_sin(pos_ptr, cos_ptr, sin_ptr, seq, stride_table, dims % HALF, dim_mask)  # [BLOCK_D]
        q = roped(q_ptrs, io_mask, dims, c, s, qw_ptr, eps, HALF, NORM).to(q_ptr.dtype.element_ty)
        cached_end = tl.minimum(end, seq_len - 1)
    else:
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)
        cached_end = end

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    head_offset = kv_head * stride_ch
    for tile_start in range(start, cached_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < cached_end
        acc, m_i, l_i = attend_tile(
            q, cache_ptr, stride_kv, table, pos, valid, valid[None, :], head_offset, dims, dim_mask,
            stride_cb, stride_ct, acc, m_i, l_i, scale_log2, BLOCK_SIZE, DOT_PRECISION,
        )  # fmt: skip
    if NEW_TOKEN:
        holds = (start < seq_len) & (end == seq_len)  # this partition ends at the new token: one a head
        acc, m_i, l_i = store_and_attend(
            q, k_ptr, v_ptr, slot_ptr, kw_ptr, eps, k_inv_scale, v_inv_scale,
            cache_ptr, stride_kv, stride_cb, stride_ct, head_offset, seq, kv_head,
            stride_kt, stride_kh, stride_vt, stride_vh, c, s, dims, dim_mask, holds,
            acc, m_i, l_i, scale_log2, BLOCK_SIZE, HALF, NORM,
        )  # fmt: skip
    _write_partition(
        acc, m_i, l_i, v_scale, out_ptr, part_out_ptr, part_lse_ptr, seq, heads, split, dims, row_mask,
        io_mask, stride_ot, stride_oh, stride_pb, stride_ph, stride_ps, SINGLE_SPLIT,
    )  # fmt: skip


@triton.jit
def _partition(seq_lens_ptr, seq, split, num_splits, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    """The sequence's length and this partition's [start, end) of it: whole tiles, split evenly."""
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    return seq_len, start, tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)


@triton.jit
def _write_partition(  # type: ignore[no-untyped-def]
    acc, m_i, l_i, v_scale, out_ptr, part_out_ptr, part_lse_ptr, seq, heads, split, dims, row_mask,
    io_mask, stride_ot, stride_oh, stride_pb, stride_ph, stride_ps, SINGLE_SPLIT: tl.constexpr,
):  # fmt: skip
    """A partition's normalized output times v_scale (the output itself with one partition) and its
    log-sum-exp."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None] * v_scale  # exact for a pool of scale 1
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = seq * stride_pb + heads * stride_ph + split * stride_ps  # [BLOCK_G]
        tl.store(part_out_ptr + part[:, None] + dims[None, :], out, mask=io_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part // stride_ps, lse, mask=row_mask)


@triton.jit(do_not_specialize=["stride_pb", "stride_ph", "stride_ps"])
def _decode_reduce_kernel(  # type: ignore[no-untyped-def]
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_prior(PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    base = seq * stride_pb + head * stride_ph
    lse = tl.load(part_lse_ptr + base // stride_ps + splits)  # [NUM_SPLITS]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no partition saw a key: zeros out
    weights = tl.exp2(lse - lse_max)
    parts = tl.load(
        part_out_ptr + base + splits[:, None] * stride_ps + dims[None, :], mask=dim_mask[None, :], other=0.0
    )  # [NUM_SPLITS, BLOCK_D]
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask
    )


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device, max_splits: int, min_tokens: int
) -> int:
    """A power of two: enough (sequence, kv head, split) programs for two waves, at most `max_splits`,
    none shorter than `min_tokens` (the tuning file's decode limits).

    Any value is correct for any lengths; it only sets how the work is spread.
    """
    programs = max(1, batch * num_kv_heads)
    wanted = -(-2 * num_sms(device) // programs)
    cap = max(1, max_seq_len // min_tokens)
    splits = min(pow2(wanted), max_splits)
    while splits > 1 and splits > cap:
        splits //= 2
    return splits


def paged_decode(
    q: torch.Tensor,  # [B, num_heads, D]: one query token per sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [B]: context length including this token; 0 = padding
    out: torch.Tensor,  # [B, num_heads, D], written
    scale: float,
    num_splits: int,
    tiles: AttentionTiles,  # the tuning's; `config` overrides its decode tile
    config: tuple[int, int, int] | None = None,  # (BLOCK_N, num_warps, num_stages)
    new_token: NewToken | None = None,  # q not yet rotated: the kernel rotates, stores and attends it
    pdl: Pdl = ALWAYS,
    k_scale: float = 1.0,  # the pool holds K / k_scale, V / v_scale (engine/kv_scales.py)
    v_scale: float = 1.0,
) -> None:
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    block_d = pow2(head_dim)
    if num_splits > 1:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    fp32 = q.dtype == torch.float32
    block_n, num_warps, num_stages = config or tiles.decode_tile(q.dtype)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse, scale * k_scale * LOG2E, v_scale,
        num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *kv_cache.stride()[:4], block_tables.stride(0),
        num_heads * num_splits * head_dim, num_splits * head_dim, head_dim,
        *kernel_args(new_token, q, k_scale, v_scale),
        QUERY_GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_SIZE=kv_cache.shape[2], SINGLE_SPLIT=num_splits == 1, DOT_PRECISION=dot_precision(fp32),
        NEW_TOKEN=new_token is not None, HALF=head_dim // 2, NORM=bool(new_token and new_token.norms),
        num_warps=num_warps, num_stages=num_stages, **launch_options(q, pdl, attention=True),
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits(part_out, part_lse, out, pdl)


def _merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, pdl: Pdl) -> None:
    """out[b, h] from the partitions' outputs [B, H, splits, D] and log-sum-exps [B, H, splits]."""
    batch, num_heads, num_splits, head_dim = part_out.shape
    _decode_reduce_kernel[(batch, num_heads)](
        part_out,
        part_lse,
        out,
        num_heads * num_splits * head_dim,
        num_splits * head_dim,
        head_dim,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=pow2(head_dim),
        NUM_SPLITS=num_splits,
        num_warps=4,
        **launch_options(out, pdl, attention=True),
    )

"""Writing one step's K and V into the paged cache: one Triton launch for both, by slot_mapping.

A slot is `block_id * block_size + offset`; a negative slot (a padded token of a CUDA-graph batch)
writes nothing. Chosen over two `index_copy_` calls: one launch instead of two, strided sources
(k and v are views into the fused qkv projection) read in place, and padding that needs no dummy block.
An fp8 pool holds K / k_scale and V / v_scale (engine/kv_scales.py): the kernel multiplies by the
reciprocals it is handed (1.0 for a pool of the model's dtype, which leaves the values as they are).
This module imports triton: import it only where Triton is chosen (the kernel factory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(  # type: ignore[no-untyped-def]
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    k_inv_scale,  # 1 / k_scale, 1 / v_scale: the pool stores K / k_scale, V / v_scale
    v_inv_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,  # cache strides: K to V, block, token, head (head_dim is contiguous)
    stride_cb,
    stride_ct,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM) & (slot >= 0)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    dst_offs = dst + heads[:, None] * stride_ch + dims[None, :]
    dtype = cache_ptr.dtype.element_ty
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(cache_ptr + dst_offs, (k.to(tl.float32) * k_inv_scale).to(dtype), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(cache_ptr + stride_kv + dst_offs, (v.to(tl.float32) * v_inv_scale).to(dtype), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], last dim contiguous
    v: torch.Tensor,  # [T, num_kv_heads, head_dim], last dim contiguous
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64 (or int32); negative: skip
    k_scale: float = 1.0,  # the pool holds K / k_scale, V / v_scale
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("store_kv needs the head dimension contiguous")
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
    )

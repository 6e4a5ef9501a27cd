"""The KV pool's memory layout: block-major storage behind a layer-major view.

Everything that computes with the pool indexes it as

    kv_cache: [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]

(one layer's K or V is `kv_cache[layer, 0|1]`, the attention kernels take its strides), but the memory
underneath is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]: all of one block's KV,
every layer, K and V, is one contiguous range, and so is a run of consecutive blocks. Moving a
request's KV to another instance is then one copy per run of blocks (a single memcpy for the CUDA IPC
path, one socket read straight into the pool for TCP) instead of one per layer, K/V and run. On the
wire a payload of n blocks is [n, num_layers, 2, block_size, num_kv_heads, head_dim], contiguous.
"""

from __future__ import annotations

import torch


def allocate_kv_pool(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A zeroed pool: the layer-major view [layers, 2, blocks, ...] of block-major memory."""
    storage = torch.zeros(
        (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
    )
    return storage.permute(1, 2, 0, 3, 4, 5)


def block_major(pool: torch.Tensor) -> torch.Tensor:
    """[blocks, layers, 2, block_size, heads, dim]: a view of any pool (contiguous for ours)."""
    return pool.permute(2, 0, 1, 3, 4, 5)

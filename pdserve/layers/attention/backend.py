"""The attention backend interface: write this step's K/V into the paged cache, attend over it.

The implementations are torch_backend.py and triton_backend.py; registry.py picks one from the
model's Kernels (KernelConfig.attention).

An fp8 pool holds K / k_scale and V / v_scale, this layer's scales (engine/kv_scales.py sets them once,
after load and before the pool is used or a CUDA graph captured): a backend writes the scaled values
and reads them back by folding k_scale into the softmax scale and v_scale into the output. They stay
1.0 for a pool of the model's dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from pdserve.layers.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from pdserve.layers.norm import RMSNorm
    from pdserve.layers.rotary import RotaryEmbedding


class AttentionBackend(ABC):
    """Writes this step's K/V into the paged cache, then attends each query over its context."""

    cuda_graph_safe = False  # may a decode-only step be captured in a CUDA graph?

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_scale = 1.0
        self.v_scale = 1.0

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        if not (k_scale > 0.0 and v_scale > 0.0):
            raise ValueError(f"KV cache scales must be positive, got k {k_scale}, v {v_scale}")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...

    def forward_rotary(
        self,
        rotary: RotaryEmbedding,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        """`forward` of q and k rotated by their positions (after per-head RMSNorms, Qwen3's, if
        given). A backend that can do that while it writes the cache overrides this (fewer launches)."""
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        q, k = rotary(positions, q, k)
        return self.forward(q, k, v, kv_cache, meta)

"""The attention backend interface and its registry (torch now; triton on CUDA later)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pdserve.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Writes this step's K/V into the paged cache, then attends each query over its context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

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


def get_backend_class(device: torch.device) -> type[AttentionBackend]:
    from pdserve.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend

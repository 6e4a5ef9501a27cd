"""Which attention backend a model's layers get: the Triton one where the model's Kernels carry its
launches (KernelConfig.attention, resolved by pdserve.kernels.factory), the torch one otherwise."""

from __future__ import annotations

from pdserve.kernels.ops import Kernels
from pdserve.layers.attention.backend import AttentionBackend
from pdserve.layers.attention.torch_backend import TorchAttentionBackend
from pdserve.layers.attention.triton_backend import TritonAttentionBackend


def backend_class(kernels: Kernels) -> type[AttentionBackend]:
    return TorchAttentionBackend if kernels.attention is None else TritonAttentionBackend


def make_backend(
    kernels: Kernels, num_heads: int, num_kv_heads: int, head_dim: int, scale: float
) -> AttentionBackend:
    """One layer's attention backend."""
    if kernels.attention is None:
        return TorchAttentionBackend(num_heads, num_kv_heads, head_dim, scale)
    return TritonAttentionBackend(num_heads, num_kv_heads, head_dim, scale, kernels.attention)

"""RMSNorm, optionally fused with the residual add that precedes it (one Triton kernel on CUDA); the
added x may come as split_k.Partials, whose reduce then happens in the same kernel."""

from __future__ import annotations

import torch
from torch import nn

from pdserve.layers.split_k import Partials


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from pdserve.layers import triton_fused  # imported for CUDA only: CPU never loads triton

            return triton_fused.rms_norm(x, self.weight, self.eps)
        return rms_norm_torch(x, self.weight, self.eps)

    def forward_residual(
        self, x: torch.Tensor | Partials, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm block's two outputs."""
        if residual.is_cuda:
            from pdserve.layers import triton_fused

            return triton_fused.add_rms_norm(x, residual, self.weight, self.eps)
        x = x.total() if isinstance(x, Partials) else x
        residual = x + residual
        return rms_norm_torch(residual, self.weight, self.eps), residual

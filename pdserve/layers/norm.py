"""RMSNorm, optionally fused with the residual add that precedes it; the added x may come as
split_k.Partials, whose reduce then happens in the same kernel. The computation is the model's
chosen implementation (pdserve.kernels)."""

from __future__ import annotations

import torch
from torch import nn

from pdserve.kernels.ops import Kernels
from pdserve.kernels.split_k import Partials


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def forward_residual(
        self, x: torch.Tensor | Partials, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm block's two outputs."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)

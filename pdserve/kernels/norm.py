"""RMSNorm and the residual add before it, in torch: the reference the Triton kernels (triton_fused.py)
round like, and the implementation wherever Triton is not chosen."""

from __future__ import annotations

import torch

from pdserve.kernels.split_k import Partials


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(
    x: torch.Tensor | Partials, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); a split_k.Partials x is first summed as F.linear would give it."""
    x = x.total() if isinstance(x, Partials) else x
    residual = x + residual
    return rms_norm(residual, weight, eps), residual

"""The model's projections in torch: x @ W^T, and gate_up followed by SiLU(gate) * up. The Triton side
(triton_linear.py) takes the few-row products to the skinny GEMM where that was measured faster."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels import activation


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(x @ gate^T) * (x @ up^T) for weight = gate stacked over up."""
    return activation.silu_and_mul(F.linear(x, weight))

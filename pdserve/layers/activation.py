"""SiLU(gate) * up on a fused gate_up projection (one Triton kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.is_cuda:
        from pdserve.layers import triton_fused  # imported for CUDA only: CPU never loads triton

        return triton_fused.silu_and_mul(gate_up)
    return silu_and_mul_torch(gate_up)

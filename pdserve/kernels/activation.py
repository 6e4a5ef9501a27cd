"""SiLU(gate) * up on a fused gate_up projection, in torch (the Triton kernel is in triton_fused.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

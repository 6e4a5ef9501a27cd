"""Rotary position embedding of q and k in torch (the rotate-half form HF Llama/Qwen use): the reference
triton_rotary.py's in-place kernel computes, and the implementation wherever Triton is not chosen."""

from __future__ import annotations

import torch


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hk, D] rotated by their positions' cos/sin rows [T, 1, D]."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

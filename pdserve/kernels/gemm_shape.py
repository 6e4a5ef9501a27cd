"""Which products x @ W^T the Triton decode GEMM (triton_skinny.py) may take at
all: on CUDA, x 2-D with rows in the kernel's range, fp16/bf16 throughout, both operands contiguous
along K, and a weight large enough that streaming it is the product's cost."""

from __future__ import annotations

import torch


def streamable(x: torch.Tensor, weight: torch.Tensor, rows: tuple[int, int], min_weight: int) -> bool:
    """Whether x [M, K] @ weight [N, K]^T fits: rows[0] <= M <= rows[1], weight.numel() >= min_weight."""
    return (
        x.is_cuda
        and x.dim() == 2
        and rows[0] <= x.shape[0] <= rows[1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.numel() >= min_weight
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )

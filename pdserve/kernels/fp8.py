"""fp8 (e4m3) products: x @ W^T for a weight quantized per output row, the activations quantized per
token at run time (dynamic scales: each row of x by its own max |x| / 448).

    scaled_mm_linear   on a GPU with fp8 tensor cores (sm_90+): torch._scaled_mm with row-wise scales,
                       x's scale [M, 1] and W's [1, N] applied to the fp32 accumulator (cuBLASLt)
    emulated_linear    anywhere: x quantized to e4m3 and back, W dequantized, a float matmul -- the same
                       math in higher precision, what the CPU runs and what the GPU path is tested against

Pure torch (no triton): the factory binds one of them to Kernels.fp8_linear (scaled_mm_linear with
triton_fp8's one-launch quantizer where Triton is chosen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # an all-zero row of x still gets a finite scale
Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~= q * scale, row by row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def emulated_linear(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [.., K] @ (weight [N, K] e4m3 * w_scale [N])^T (+ bias), x rounded through e4m3 per row first."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize_rows(rows)
    xq = (q.float() * scale).to(x.dtype)
    w = (weight.float() * w_scale[:, None]).to(x.dtype)
    return F.linear(xq, w, bias).view(*x.shape[:-1], weight.shape[0])


def has_fp8_mm(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs fp8 with row-wise scales on `device` (Hopper, sm_90, or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    quantize: Quantizer = quantize_rows,
) -> torch.Tensor:
    """emulated_linear's product on the fp8 tensor cores, x quantized by `quantize` (quantize_rows, or
    its one-launch Triton form, triton_fp8.py); shapes cuBLASLt refuses (K or N not a multiple of 16)
    take the emulation."""
    n, k = weight.shape
    if k % 16 or n % 16 or not x.is_cuda:
        return emulated_linear(x, weight, w_scale, bias)
    rows = x.reshape(-1, k)
    q, scale = quantize(rows)
    # row-wise scaling wants a bf16 result; W^T as the column-major [K, N] view of W
    y = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=w_scale.view(1, n), out_dtype=torch.bfloat16)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], n)

"""The quantized products when Triton is chosen: Kernels.wint_linear and Kernels.fp8_linear, each
product sent by its rows of x to the kernel triton_wquant_plan.route names.

    wint8 / wint4   skinny (triton_wquant_skinny.py) up to 128 rows, the tile kernel (triton_wquant.py)
                    up to 1023, past that the weight dequantized once then F.linear (cuBLAS)
    fp8             skinny, weight-only (e4m3 -> x's dtype in registers, no activation quantization,
                    one launch) up to 16 rows on a GPU with fp8 tensor cores; past that, and elsewhere,
                    the product the factory chose (torch._scaled_mm with per-token scales, or the
                    emulation)

This module imports triton (through the kernels): only the factory imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels import triton_wquant, triton_wquant_plan, triton_wquant_skinny
from pdserve.kernels.sm_count import num_sms

Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def quantized_product(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: str, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [.., K] @ W^T (+ bias) -> [.., N] in x's dtype for `fmt`'s (layers/quant.py) data and scale,
    by route(): the skinny kernel, the tile kernel or dequantize-then-F.linear (fp8: skinny only)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    (m, k), n = rows.shape, weight.shape[0]
    way = triton_wquant_plan.route(fmt, m)
    if way == "skinny" or fmt == "fp8":
        plan = triton_wquant_plan.plan(fmt, n, k, m, num_sms(x.device))
        y = triton_wquant_skinny.wq_skinny_linear(rows, weight, scale, fmt, plan, bias)
    elif way == "tiles":
        y = triton_wquant.wquant_linear(rows, weight, scale, bias)
    else:
        y = F.linear(rows, triton_wquant.dequantize(weight, scale, fmt, k, x.dtype), bias)
    return y.view(*x.shape[:-1], n)


def wint_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Kernels.wint_linear: scale [N] -> wint8 int8 [N, K]; scale [N, K/128] -> wint4 packed [N, K/2]."""
    return quantized_product(x, weight, scale, "wint4" if scale.dim() == 2 else "wint8", bias)


@dataclass(frozen=True)
class Fp8Linear:
    """Kernels.fp8_linear: the weight-only skinny kernel at decode rows where `skinny` (a GPU with fp8
    tensor cores), else `wide` (the activation-quantized product)."""

    wide: Product
    skinny: bool

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if self.skinny and triton_wquant_plan.route("fp8", rows) == "skinny":
            return quantized_product(x, weight, scale, "fp8", bias)
        return self.wide(x, weight, scale, bias)

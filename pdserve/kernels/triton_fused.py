"""Fused elementwise kernels for the CUDA hot path: residual-add + RMSNorm, RMSNorm, and SiLU(gate) * up.

Each kernel reads its inputs once and writes its outputs once, and rounds where the torch code in
norm.py / activation.py rounds (fp32 math; the sum, the normalized value and the SiLU rounded to the
input dtype), so CUDA results match the torch ones up to the order of a row's sum.

`rms_norm`, `add_rms_norm` (x a tensor or a split_k.Partials) and `silu_and_mul` are what the model
calls when Triton is chosen: the kernel for CUDA tensors of the shapes it takes, the torch code
otherwise. This module imports triton: only the kernel factory (factory.py) imports it, when Triton is
chosen, so a CPU process never does (and TRITON_INTERPRET can still be set first by a test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import activation, norm
from pdserve.kernels.pdl import ALWAYS, Pdl, launch_options
from pdserve.kernels.split_k import Partials
from pdserve.kernels.triton_pdl import wait_prior

MAX_NORM_COLS = 65536  # one row per program, loaded whole
SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PARTS: tl.constexpr = 0,
    stride_part=0,
    PDL: tl.constexpr = False,
):
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if PARTS:  # x = PARTS partial sums (split_k.Partials): their sum rounded as F.linear rounds
        parts = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(PARTS):
            parts += tl.load(x_ptr + s * stride_part + row * stride_x + cols, mask=mask, other=0.0)
        x = parts.to(res_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    act = x.dtype  # the activations' dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(act)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    normed = (x32 * rstd).to(act).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, cols] with a contiguous last dim (a view when the strides allow it)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms_norm(
    x2: torch.Tensor,
    r2: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    parts: torch.Tensor | None = None,
    pdl: Pdl = ALWAYS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x2, r2: [rows, n]. Returns (normed, x2 + r2); without r2 the second is the first, unwritten twice.
    With `parts` ([S, rows, n] fp32, r2 given) x2 is their sum rounded to x2's dtype: x2 itself is
    never read, only its shape and dtype (the caller passes the residual)."""
    out = torch.empty(x2.shape, dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    res_out = torch.empty_like(x2) if r2 is not None else out
    if x2.shape[0]:
        block = int(triton.next_power_of_2(x2.shape[1]))
        _rms_norm_kernel[(x2.shape[0],)](
            x2 if parts is None else parts,
            r2 if r2 is not None else x2,
            weight,
            out,
            res_out,
            x2.stride(0) if parts is None else parts.stride(1),
            r2.stride(0) if r2 is not None else 0,
            out.stride(0),
            res_out.stride(0),
            x2.shape[1],
            eps,
            BLOCK=block,
            HAS_RESIDUAL=r2 is not None,
            PARTS=0 if parts is None else parts.shape[0],
            stride_part=0 if parts is None else parts.stride(0),
            num_warps=_norm_warps(block),
            **launch_options(x2, pdl),
        )
    return out, res_out


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: Pdl = ALWAYS) -> torch.Tensor:
    return _launch_rms_norm(_rows(x), None, weight, eps, pdl=pdl)[0].view(x.shape)


def triton_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: Pdl = ALWAYS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) in one pass."""
    out, new_residual = _launch_rms_norm(_rows(x), _rows(residual), weight, eps, pdl=pdl)
    return out.view(x.shape), new_residual.view(x.shape)


def triton_add_partials_rms_norm(
    parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: Pdl = ALWAYS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(p + residual), p + residual) for p = parts.sum(0) rounded to residual's dtype (a
    split_k.Partials' parts [S, rows, n] fp32, contiguous rows), in one pass."""
    r2 = _rows(residual)
    assert parts.dim() == 3 and parts.shape[1:] == r2.shape and parts.stride(2) == 1
    out, new_residual = _launch_rms_norm(r2, r2, weight, eps, parts, pdl)
    return out.view(residual.shape), new_residual.view(residual.shape)


def triton_silu_and_mul(gate_up: torch.Tensor, pdl: Pdl = ALWAYS) -> torch.Tensor:
    """[..., 2I] -> [..., I]: SiLU of the first half times the second half."""
    x2 = _rows(gate_up)
    inter = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0]:
        grid = (x2.shape[0], triton.cdiv(inter, SILU_BLOCK))
        _silu_mul_kernel[grid](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            inter,
            BLOCK=SILU_BLOCK,
            num_warps=4,
            **launch_options(x2, pdl),
        )
    return out.view(*gate_up.shape[:-1], inter)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: Pdl = ALWAYS) -> torch.Tensor:
    if x.is_cuda and x.shape[-1] <= MAX_NORM_COLS:
        return triton_rms_norm(x, weight, eps, pdl)
    return norm.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor | Partials, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: Pdl = ALWAYS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); a split_k.Partials x is summed inside the norm kernel."""
    fusable = x.shape == residual.shape and x.dtype == residual.dtype and x.shape[-1] <= MAX_NORM_COLS
    if residual.is_cuda and fusable:
        if isinstance(x, Partials):
            return triton_add_partials_rms_norm(x.parts, residual, weight, eps, pdl)
        return triton_add_rms_norm(x, residual, weight, eps, pdl)
    return norm.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor, pdl: Pdl = ALWAYS) -> torch.Tensor:
    if gate_up.is_cuda and gate_up.shape[-1] % 2 == 0:
        return triton_silu_and_mul(gate_up, pdl)
    return activation.silu_and_mul(gate_up)

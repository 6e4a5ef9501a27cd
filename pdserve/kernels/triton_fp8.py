"""fp8's per-token activation quantization (kernels/fp8.py quantize_rows) as one Triton launch.

In torch it is five kernels (abs, amax, divide, clamp, cast) before every fp8 GEMM; a decode step of
a 28-layer model runs 112 of those GEMMs, so in one launch it is ~450 launches fewer a step. One
program a row of x: a pass for max |x|, then x / scale (IEEE division, as torch divides) clamped to
+-448 and rounded to e4m3. This module imports triton: only the kernel factory imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8 import E4M3_MAX, MIN_SCALE


@triton.jit
def _quantize_rows_kernel(  # type: ignore[no-untyped-def]
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, e4m3_max, min_scale, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), e4m3_max), min_scale)  # IEEE, as torch divides
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -e4m3_max), e4m3_max)
        tl.store(q_ptr + row * stride_qm + k, q.to(tl.float8e4nv), mask=k < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.quantize_rows in one launch: x [M, K] -> (e4m3 [M, K], float32 scales [M, 1])."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = min(4096, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0), E4M3_MAX, MIN_SCALE, BLOCK_K=block,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return q, scale

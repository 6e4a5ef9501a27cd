"""y = x @ W^T for a few rows of x (decode at small batch) in Triton: a weight-streaming skinny GEMM.

At a handful of rows a projection is a pass over its weight matrix; cuBLAS picks split-K kernels plus
a reduce launch for some shapes and leaves bandwidth unused on others. Each program here owns
BLOCK_N output columns for every row of x (padded to 16 for the tensor cores) and streams those
weight rows once, K in BLOCK_K steps. Measured on an H200 (benchmarks/skinny_gemm_bench.py, Qwen2.5-7B
shapes, graph-replayed, bf16): at 1 row o_proj 7.3 vs 8.6 us, gate_up 64.6 vs 71.3 us, down 34.0 vs
36.8 us; qkv (with bias) no faster (9.3 vs 9.1); at 32 rows cuBLAS is as fast or faster. With
PDSERVE_SKINNY_GEMM=1, linear.py takes this path for up to MAX_ROWS rows of large bias-free fp16/bf16
weights on CUDA (off by default until measured inside the engine: ENABLED).

linear.py imports this module only for CUDA tensors, so a CPU process never imports triton unless a
test sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Measured alone (benchmarks/skinny_gemm_bench.py) but not yet inside the engine on a GPU: off until
# `gpu_session.sh skinny` (7B decode steps with and without it, same machine) has run.
ENABLED = os.environ.get("PDSERVE_SKINNY_GEMM", "0") == "1"
MAX_ROWS = 8  # up to this many rows of x (measured faster at 1 and 8)
MIN_WEIGHT = 12_000_000  # elements of W at least (the smallest measured win: o_proj, 12.8M)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (m[:, None] < M) & (k[None, :] < K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
            w_mask = (n[:, None] < N) & (k[None, :] < K)
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=w_mask, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        mask = (m[:, None] < M) & (n[None, :] < N)
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def wanted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether linear.py should take this kernel for x @ weight^T (+ bias)."""
    return (
        ENABLED
        and HAS_TRITON
        and bias is None
        and x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.numel() >= MIN_WEIGHT
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: tuple[int, int, int, int] | None = None,  # (BLOCK_N, BLOCK_K, stages, warps); None: default_tile
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype (fp32 accumulation). Any M works;
    rows are padded to a power of two (16 at least), so it pays only for a few."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, stages, warps = tile or default_tile(n)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def default_tile(n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, stages, warps), the benchmark's best on 7B shapes: few column tiles (o, down:
    N = 3584, 112 programs) stream longer K steps; many (gate_up: 1184 programs) shorter ones."""
    return (32, 512, 3, 4) if n <= 8192 else (32, 256, 4, 4)

"""y = x @ W^T for a few rows of x (decode at small batch) in Triton: a weight-streaming skinny GEMM.

At a handful of rows a projection is a pass over its weight matrix; cuBLAS picks split-K kernels plus
a reduce launch for some shapes and leaves bandwidth unused on others. Each program here owns
BLOCK_N output columns for every row of x (padded to 16 for the tensor cores) and streams those
weight rows once, K in BLOCK_K steps. Measured on an H200 (benchmarks/skinny_gemm_bench.py, weights
cycled past the L2, bf16, 1 row): Qwen2.5-7B o 9.8 vs 10.8 us, gate_up 65.0 vs 70.0, down 36.9 vs
37.7; Qwen2.5-32B gate_up ~2% faster; at 32 rows cuBLAS is as fast or faster. Where the 32-column
programs fill their last wave of SMs poorly (32B o/down: 160 programs on 132 SMs) cuBLAS's split-K
wins, so plan() leaves those to it. Inside the engine (gpu_session.sh skinny, one H200, decode
launched ahead, 2 rounds): 7B B=1 4.35 -> 4.22 ms, B=8 4.56 -> 4.48; 32B B=1 18.74 -> 17.73, B=8
19.19 -> 18.43. linear.py takes this path for up to MAX_ROWS rows of large bias-free fp16/bf16
weights on CUDA; PDSERVE_SKINNY_GEMM=0 turns it off.

linear.py imports this module only for CUDA tensors, so a CPU process never imports triton unless a
test sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from pdserve.layers.sm_count import num_sms

HAS_TRITON = importlib.util.find_spec("triton") is not None
ENABLED = os.environ.get("PDSERVE_SKINNY_GEMM", "1") != "0"
MAX_ROWS = 16  # up to this many rows of x (one 16-row tensor-core tile; faster at 1, 8, 16, not 32)
MIN_WEIGHT = 12_000_000  # elements of W at least (the smallest measured win: o_proj, 12.8M)
BLOCK_N = 32  # output columns per program (16 measured 30% slower on 32B o/down, 64 no faster)
MIN_WAVE_FILL = 0.8  # programs / (waves x SMs) a tile must reach, else F.linear
ONE_WAVE = (512, 3)  # (BLOCK_K, stages) when the programs fit in one wave: long K steps (4 stages:
# 4-6% faster alone at 7B o/down, skinny_gemm-l2-cycled-2026-11-30.json; not yet measured in the engine)
MANY_WAVES = (256, 4)  # the same for several waves
Tile = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, stages, warps)

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


def tile_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Tile | None:
    """The tile linear.py should run x @ weight^T (+ bias) with here, or None for F.linear."""
    taken = (
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
    return plan(weight.shape[0], num_sms(x.device)) if taken else None


def plan(n: int, sms: int) -> Tile | None:
    """(BLOCK_N, BLOCK_K, stages, warps) for N output columns on `sms` SMs, or None where the programs
    fill their waves to less than MIN_WAVE_FILL (a short last wave leaves SMs idle for a whole
    program's time; cuBLAS splits K instead). One wave streams longer K steps, several shorter."""
    programs = -(-n // BLOCK_N)
    waves = -(-programs // sms)
    if programs / (waves * sms) < MIN_WAVE_FILL:
        return None
    return (BLOCK_N, *ONE_WAVE, 4) if waves == 1 else (BLOCK_N, *MANY_WAVES, 4)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: Tile | None = None,  # None: default_tile
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


def default_tile(n: int) -> Tile:
    """plan()'s tile for N columns on an H200 (132 SMs); the many-wave tile where plan() would leave
    N to cuBLAS (a caller of skinny_linear without a tile asked for this kernel anyway)."""
    return plan(n, 132) or (BLOCK_N, *MANY_WAVES, 4)

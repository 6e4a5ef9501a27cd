"""y = x @ W^T for a few rows of x (decode at small batch) in Triton: a weight-streaming skinny GEMM.

At a handful of rows a projection is a pass over its weight matrix; cuBLAS picks split-K kernels plus
a reduce launch for some shapes and leaves bandwidth unused on others. Each program here owns
BLOCK_N output columns for every row of x (padded to 16 for the tensor cores) and streams those
weight rows once, K in BLOCK_K steps. Where the programs fill their last wave of SMs poorly (a 32B
o_proj or down_proj: 160 programs on 132 SMs) cuBLAS's split-K wins, so plan() leaves those to it.
The tables (tile widths, wave fill, K steps, rows, and the gate_up tiles with SiLU * up in the
epilogue at 17-64 rows) are the tuning file's `skinny` section (tuning/tables.py); the measurements
behind them (benchmarks/skinny_gemm_bench.py and engine A/Bs) are in docs/performance.md.
triton_linear.py decides which products come here; `KernelConfig.skinny_gemm=off` turns it off,
`gated_rows=off` only the 17-64-row gate_up tiles.

This module imports triton: only the kernel factory (factory.py) imports it, when Triton is chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.gemm_shape import streamable
from pdserve.kernels.pdl import ALWAYS, Pdl, launch_options
from pdserve.kernels.sm_count import num_sms
from pdserve.kernels.triton_pdl import wait_prior
from pdserve.kernels.tuning.tables import SkinnyTuning, Tile


@triton.jit
def _skinny_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """y[:, n] = x @ W[n]^T; GATED: W stacks gate over up (2N rows), y[:, n] = SiLU(x @ W[n]^T) *
    (x @ W[N + n]^T), each product rounded to y's dtype first, as silu_and_mul on the GEMM's
    output would see it."""
    wait_prior(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (m[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
        w_mask = (n[:, None] < N) & (k[None, :] < K)
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(x, tl.trans(w))
        if GATED:
            up = tl.load(w_ptr + (N + n[:, None]) * stride_wn + k[None, :], mask=w_mask, other=0.0)
            acc_up += tl.dot(x, tl.trans(up))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    if GATED:
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = act * acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
    mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def tile_for(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: SkinnyTuning
) -> Tile | None:
    """The tile to run x @ weight^T (+ bias) with here, or None for F.linear."""
    taken = bias is None and streamable(x, weight, (1, t.max_rows), t.min_weight)
    return plan(weight.shape[0], num_sms(x.device), x.shape[0], t) if taken else None


def gated_rows_tile(x: torch.Tensor, weight: torch.Tensor, t: SkinnyTuning) -> Tile | None:
    """Where plan() gave no tile for gate_up: SiLU * up in the epilogue for t.gated_rows rows of x
    where t.gated_tiles has a tile for the shape, or None."""
    if not streamable(x, weight, t.gated_rows, t.min_weight):
        return None
    return gated_plan(weight.shape[0], weight.shape[1], x.shape[0], t)


def gated_plan(n: int, k: int, rows: int, t: SkinnyTuning) -> Tile | None:
    """t.gated_tiles' tile for gate_up [N, K] at `rows` rows of x (None: unmeasured shape, or cuBLAS)."""
    return next((tile for up_to, tile in t.gated_tiles.get((n, k), ()) if rows <= up_to), None)


def plan(n: int, sms: int, rows: int, t: SkinnyTuning) -> Tile | None:
    """(BLOCK_N, BLOCK_K, stages, warps) for N output columns on `sms` SMs and `rows` rows of x, or
    None for F.linear. The width of t.widths whose programs fill their waves best, the wider on a tie
    (fewer re-reads of x); None below t.min_wave_fill (a short last wave leaves SMs idle for a whole
    program's time; cuBLAS splits K instead). One wave streams longer K steps, several shorter. Past
    16 rows only one-wave grids: several waves at 32 rows were no faster than cuBLAS."""
    fill, width = max((_fill(n, sms, w), w) for w in t.widths)
    waves = -(-n // width) > sms
    if fill < t.min_wave_fill or (waves and rows > 16):
        return None
    return (width, *(t.many_waves if waves else t.one_wave), 4)


def _fill(n: int, sms: int, width: int) -> float:
    """programs / (waves x SMs) of a grid of width-column programs over N columns."""
    programs = -(-n // width)
    return programs / (-(-programs // sms) * sms)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    tile: Tile,
    bias: torch.Tensor | None = None,
    gated: bool = False,
    pdl: Pdl = ALWAYS,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype (fp32 accumulation). Any M works;
    rows are padded to a power of two (16 at least), so it pays only for a few. gated: weight is
    gate over up ([2I, K], no bias), the result SiLU(gate) * up [M, I]; the tile's BLOCK_N weight
    rows per program are then half gate, half up (the same grid as the plain product)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert not (gated and (bias is not None or weight.shape[0] % 2))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, stages, warps = tile
    block_n = block_n // 2 if gated else block_n
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages, **launch_options(x, pdl),
    )  # fmt: skip
    return y


def default_tile(n: int, t: SkinnyTuning) -> Tile:
    """plan()'s tile for N columns on t.default_sms SMs; the many-wave tile where plan() would leave
    N to cuBLAS (for a caller, a test or a benchmark, that asks for this kernel anyway)."""
    return plan(n, t.default_sms, 1, t) or (t.widths[0], *t.many_waves, 4)

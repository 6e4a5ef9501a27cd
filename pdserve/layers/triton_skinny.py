"""y = x @ W^T for a few rows of x (decode at small batch) in Triton: a weight-streaming skinny GEMM.

At a handful of rows a projection is a pass over its weight matrix; cuBLAS picks split-K kernels plus
a reduce launch for some shapes and leaves bandwidth unused on others. Each program here owns
BLOCK_N output columns for every row of x (padded to 16 for the tensor cores) and streams those
weight rows once, K in BLOCK_K steps. Microbenchmark (benchmarks/skinny_gemm_bench.py, H200, weights
cycled past the L2, bf16; docs/bench/h200/skinny_gemm-rows-16-32-2026-11-30.json), us vs cuBLAS:
7B o 9.4 vs 11.1 at 16 rows, 10.4 vs 11.4 at 32; down 35.2 vs 38.9, 37.3 vs 41.2; 32B gate_up 135.1
vs 143.5 at 16 rows with 64-column programs. Where the programs fill their last wave of SMs poorly
(32B o/down: 160 programs on 132 SMs) cuBLAS's split-K wins, so plan() leaves those to it. Inside
the engine (gpu_session.sh skinny, one H200, decode launched ahead, ms): on vs off 7B B=1 4.35 ->
4.22, 32B B=1 18.74 -> 17.73 (fifth session); sixth session: one-wave grids 4 stages deep instead
of 3, 7B B=1 4.21 -> 4.16, B=8 4.48 -> 4.39; 64-column programs on fill ties, 32B B=1 17.41 ->
17.10, B=8 18.16 -> 17.90; one-wave grids up to 32 rows, 7B B=32 5.26 -> 5.03.
linear.py takes this path for up to MAX_ROWS rows of large bias-free fp16/bf16 weights on CUDA, and
for gate_up with SiLU * up in the epilogue at 17-64 rows where GATED_TILES holds a tile measured
faster than cuBLAS then silu_and_mul (7B B=32 4.83 -> 4.65 ms a step, 32B 19.66 -> 19.24);
PDSERVE_SKINNY_GEMM=0 turns it off, PDSERVE_GATED_ROWS=0 only the latter.

linear.py imports this module only for CUDA tensors, so a CPU process never imports triton unless a
test sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from pdserve.layers.gemm_shape import streamable
from pdserve.layers.pdl import launch_options
from pdserve.layers.sm_count import num_sms

HAS_TRITON = importlib.util.find_spec("triton") is not None
ENABLED = os.environ.get("PDSERVE_SKINNY_GEMM", "1") != "0"
MAX_ROWS = 32  # up to this many rows of x; past 16 only one-wave grids (plan())
MIN_WEIGHT = 12_000_000  # elements of W at least (the smallest measured win: o_proj, 12.8M)
WIDTHS = (32, 64)  # output columns per program (BLOCK_N) plan() picks from; 16 was 30% slower
MIN_WAVE_FILL = 0.8  # programs / (waves x SMs) a tile must reach, else F.linear
ONE_WAVE = (512, 4)  # (BLOCK_K, stages) when the programs fit in one wave: long K steps, 4 deep
MANY_WAVES = (256, 4)  # the same for several waves
FUSED_SILU = True  # linear.silu_mul_linear: SiLU(gate) * up in the gate_up GEMM's epilogue, for
FUSED_MIN_WIDTH = 64  # tiles at least this wide (32 gate + 32 up columns; 16 + 16 were 5% slower a
# 7B step, docs/bench/h200/skinny-ab-fused-silu-2026-11-30.log)
Tile = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, stages, warps)
GATED_ROWS = (17, 64)  # rows of x where gated_rows_tile may take gate_up (plan() leaves it to
# cuBLAS there), SiLU * up fused; at 128 rows it lost (7B 91.4 vs 76.9 us; 32B 159.5 vs 152.1)
GATED_ROWS_ON = os.environ.get("PDSERVE_GATED_ROWS", "1") != "0"
# gate_up shapes (2 x intermediate, hidden) measured to win -> (up to rows, tile or None: cuBLAS);
# skinny_gemm_bench.py --gated (H200, vs cuBLAS then silu_and_mul, us; docs/bench/h200/gated_gemm-*-
# 2026-11-30.json) and engine A/Bs (gpu_session.sh ab nogated, launched ahead, ms)
GATED_TILES: dict[tuple[int, int], tuple[tuple[int, Tile | None], ...]] = {
    # Qwen2.5-7B: 32 rows 66.9 vs 73.4 (64-column tiles > 75), B=32 4.83 -> 4.65 ms; 48 rows 73.2 vs
    # 72.4; 64 rows 72.1 vs 76.0 (128 columns 74.1), B=64 5.53 -> 5.47
    (37888, 3584): ((32, (128, 64, 3, 4)), (48, None), (64, (64, 64, 4, 4))),
    # Qwen2.5-32B: 32 rows with Qwen3-32B's tile below, B=32 19.66 -> 19.24 ms (ninth session; the 7B
    # tile lost, 19.87 -> 20.44); 48 rows 137.4 vs 145.3, 64 rows 137.6 vs 142.3, B=64 22.38 -> 22.21
    (55296, 5120): ((32, (256, 128, 3, 8)), (64, (128, 64, 4, 4))),
    # Qwen3-32B: 32 rows 127.0 vs 139.3 with (256, 128, 3, 8), B=32 21.02 -> 20.21 ms (ninth
    # session); 48 rows 133.7 vs 140.9, 64 rows 135.4 vs 140.0 (microbenchmark only: the 32B tile's
    # engine gain above stands in). Qwen3-8B: within 2% at 32-64 rows, no entry
    (51200, 5120): ((32, (256, 128, 3, 8)), (64, (128, 64, 4, 4))),
    # Llama-3.1-8B: 32 rows 59.7 vs 60.3 (no entry); 48 rows 60.5 vs 64.3, 64 rows 61.2 vs 65.0; B=48
    # 6.47 -> 6.39 ms, B=64 6.91 -> 6.80 (tenth session)
    (28672, 4096): ((32, None), (64, (128, 128, 4, 4))),
}

if HAS_TRITON:
    import triton
    import triton.language as tl

    from pdserve.layers.pdl import wait_prior

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


def tile_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Tile | None:
    """The tile linear.py should run x @ weight^T (+ bias) with here, or None for F.linear."""
    taken = ENABLED and HAS_TRITON and bias is None and streamable(x, weight, (1, MAX_ROWS), MIN_WEIGHT)
    return plan(weight.shape[0], num_sms(x.device), x.shape[0]) if taken else None


def gated_rows_tile(x: torch.Tensor, weight: torch.Tensor) -> Tile | None:
    """For silu_mul_linear where plan() gave no tile: gate_up with SiLU * up in the epilogue for
    GATED_ROWS rows of x where GATED_TILES has a tile for the shape, or None."""
    ok = GATED_ROWS_ON and ENABLED and FUSED_SILU and HAS_TRITON
    if not (ok and streamable(x, weight, GATED_ROWS, MIN_WEIGHT)):
        return None
    return gated_plan(weight.shape[0], weight.shape[1], x.shape[0])


def gated_plan(n: int, k: int, rows: int) -> Tile | None:
    """GATED_TILES' tile for gate_up [N, K] at `rows` rows of x (None: unmeasured shape, or cuBLAS)."""
    return next((tile for up_to, tile in GATED_TILES.get((n, k), ()) if rows <= up_to), None)


def plan(n: int, sms: int, rows: int = 1) -> Tile | None:
    """(BLOCK_N, BLOCK_K, stages, warps) for N output columns on `sms` SMs and `rows` rows of x, or
    None for F.linear. The width of WIDTHS whose programs fill their waves best, the wider on a tie
    (fewer re-reads of x); None below MIN_WAVE_FILL (a short last wave leaves SMs idle for a whole
    program's time; cuBLAS splits K instead). One wave streams longer K steps, several shorter. Past
    16 rows only one-wave grids: several waves at 32 rows were no faster than cuBLAS (7B gate_up 70.3
    vs 71.5 us, 32B 149.7 vs 143.3; skinny_gemm-rows-16-32-2026-11-30.json)."""
    fill, width = max((_fill(n, sms, w), w) for w in WIDTHS)
    waves = -(-n // width) > sms
    if fill < MIN_WAVE_FILL or (waves and rows > 16):
        return None
    return (width, *(MANY_WAVES if waves else ONE_WAVE), 4)


def _fill(n: int, sms: int, width: int) -> float:
    """programs / (waves x SMs) of a grid of width-column programs over N columns."""
    programs = -(-n // width)
    return programs / (-(-programs // sms) * sms)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: Tile | None = None,  # None: default_tile
    gated: bool = False,
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
    block_n, block_k, stages, warps = tile or default_tile(weight.shape[0])
    block_n = block_n // 2 if gated else block_n
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages, **launch_options(x),
    )  # fmt: skip
    return y


def default_tile(n: int) -> Tile:
    """plan()'s tile for N columns on an H200 (132 SMs); the many-wave tile where plan() would leave
    N to cuBLAS (a caller of skinny_linear without a tile asked for this kernel anyway)."""
    return plan(n, 132) or (WIDTHS[0], *MANY_WAVES, 4)

"""y = x @ W^T for 33-128 rows of x (decode at batch 32-128) in Triton: K split over the SMs, each
column tile's partial sums added up by whichever of its programs finishes last.

At these rows a decode projection is still a pass over its weight, but the skinny kernel (one
program a column tile, every row of x) re-reads x once per program and runs several waves, and
cuBLAS runs 7B's down projection at ~77% of the copy ceiling plus a separate split-K reduce launch
(40.3 + 3.6 us a layer at 128 rows vs 32.1 at the ceiling; docs/performance.md). Here a grid of
(column tiles, splits) programs, about one wave, each multiplies all rows of x by its tile's weight
rows over its K range; with several splits each stores its fp32 partial in a workspace and counts
itself in at the tile's lock (an atomic add, acquire-release at GPU scope, after a barrier so all
of its threads' stores come first); the program that arrives last sums the tile's partials (read
past L1), resets the lock for the next call and writes y. No reduce launch, no zeroed buffer. The
workspace and locks are allocated once per device at a fixed size (CUDA graphs keep their
addresses); a product that does not fit takes F.linear.

Not measured on a GPU yet: opt-in with PDSERVE_SPLITK_GEMM=1 (linear.py), for the next device
session's microbenchmark (benchmarks/skinny_gemm_bench.py --splitk) and engine A/B
(scripts/engine_variant.py splitk). Imported only for CUDA tensors (or tests that set
TRITON_INTERPRET first).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from pdserve.layers.gemm_shape import streamable
from pdserve.layers.pdl import launch_options
from pdserve.layers.sm_count import num_sms

HAS_TRITON = importlib.util.find_spec("triton") is not None
ENABLED = os.environ.get("PDSERVE_SPLITK_GEMM", "0") == "1"
MIN_ROWS, MAX_ROWS = 33, 128  # below: triton_skinny's range; above: prefill-sized, cuBLAS
MIN_WEIGHT = 12_000_000  # elements of W at least, as for the skinny kernel
WORKSPACE_FLOATS = 4 << 20  # fp32 partials a device's workspace holds (16 MiB)
MAX_TILES = 1024  # column tiles a product may have (one lock each)
MIN_STEPS = 4  # BLOCK_K steps a split gets at least
WIDTHS = (64, 128)  # output columns per program (BLOCK_N) plan() picks from
BLOCK_K = 64  # 128 spilled registers at 8 warps (ptxas, sm_90a)
MIN_FILL = 0.75  # programs / SMs a grid must reach, else cuBLAS
SplitTile = tuple[int, int, int, int, int]  # (BLOCK_N, BLOCK_K, splits, stages, warps)
_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # device index -> (workspace, locks)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from pdserve.layers.pdl import wait_prior

    @triton.jit
    def _store_y(  # type: ignore[no-untyped-def]
        acc, b_ptr, y_ptr, m, n, M, N, stride_ym, HAS_BIAS: tl.constexpr
    ):
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        mask = (m[:, None] < M) & (n[None, :] < N)
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["steps_per_split"])
    def _splitk_kernel(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, steps_per_split, stride_xm, stride_wn,
        stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Program (tile, split): x[:, K range] @ W[tile columns, K range]^T; the tile's last
        program to arrive adds up the SPLITS partials and writes y (with one split: at once).
        K is a multiple of BLOCK_K and a split whole steps of it: no mask along K, which would
        leave every load a 2-byte one (the masks on rows and columns are constant along K, so
        loads stay 16-byte and cp.async-pipelined)."""
        wait_prior(PDL)
        tile = tl.program_id(0)
        split = tl.program_id(1)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        first = split * steps_per_split
        last = tl.minimum(first + steps_per_split, K // BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(first, last):
            k = step * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m[:, None] < M)
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=n[:, None] < N)
            acc += tl.dot(x, tl.trans(w))
        if SPLITS == 1:
            _store_y(acc, b_ptr, y_ptr, m, n, M, N, stride_ym, HAS_BIAS)
        else:
            cell = m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            parts = ws_ptr + tile * SPLITS * BLOCK_M * BLOCK_N
            tl.store(parts + split * BLOCK_M * BLOCK_N + cell, acc)
            tl.debug_barrier()  # every thread's partial stored before the count is released
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLITS):
                    total += tl.load(parts + s * BLOCK_M * BLOCK_N + cell, cache_modifier=".cg")
                tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
                _store_y(total, b_ptr, y_ptr, m, n, M, N, stride_ym, HAS_BIAS)


def tile_for(x: torch.Tensor, weight: torch.Tensor) -> SplitTile | None:
    """The tile linear.py should run x @ weight^T with here, or None (another path)."""
    taken = ENABLED and HAS_TRITON and streamable(x, weight, (MIN_ROWS, MAX_ROWS), MIN_WEIGHT)
    taken = taken and weight.shape[1] % BLOCK_K == 0
    return plan(weight.shape[0], weight.shape[1], num_sms(x.device), x.shape[0]) if taken else None


def plan(n: int, k: int, sms: int, rows: int = MAX_ROWS) -> SplitTile | None:
    """(BLOCK_N, BLOCK_K, splits, stages, warps) for N columns and K inputs on `sms` SMs: of WIDTHS
    the tile width whose grid, with as many splits as keep it within one wave (each at least
    MIN_STEPS K steps), fills the SMs best (the narrower on a tie); 128 columns only up to 64 rows
    (a 128 x 128 fp32 accumulator takes 255 registers and spills at 8 warps; 128 x 64 takes 128).
    None below MIN_FILL (gate_up's tiles alone fill more than a wave: cuBLAS) or where the partials
    would not fit."""
    best: tuple[float, int, int, int] | None = None
    for block_n in WIDTHS if rows <= 64 else WIDTHS[:1]:
        tiles = -(-n // block_n)
        if tiles > sms or tiles > MAX_TILES:
            continue
        splits = max(1, min(sms // tiles, k // (BLOCK_K * MIN_STEPS)))
        fill = tiles * splits / sms
        if tiles * splits * MAX_ROWS * block_n <= WORKSPACE_FLOATS and (best is None or fill > best[0]):
            best = (fill, block_n, splits, tiles)
    if best is None or best[0] < MIN_FILL:
        return None
    return (best[1], BLOCK_K, best[2], 4, 8)


def splitk_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: SplitTile | None = None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype (fp32 accumulation), M <= 128
    (rows padded to a power of two, 16 at least). tile: plan()'s for this shape when None."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1 and m <= MAX_ROWS
    block_n, block_k, splits, stages, warps = tile or plan(n, k, 132, m) or (64, BLOCK_K, 1, 4, 8)
    block_m = max(16, triton.next_power_of_2(m))
    tiles = triton.cdiv(n, block_n)
    assert k % block_k == 0, "K must be whole BLOCK_K steps (tile_for takes no other)"
    per_split = triton.cdiv(k // block_k, splits)  # whole K steps a split
    splits = triton.cdiv(k // block_k, per_split)  # rounding may leave fewer splits with work
    workspace, locks = _device_buffers(x.device)
    assert tiles <= locks.numel() and tiles * splits * block_m * block_n <= workspace.numel()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _splitk_kernel[(tiles, splits)](
        x, weight, weight if bias is None else bias, y, workspace, locks, m, n, k, per_split,
        x.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits, num_warps=warps, num_stages=stages,
        **launch_options(x),
    )  # fmt: skip
    return y


def _device_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's workspace and zeroed locks, allocated on first use and never again (a captured
    graph keeps their addresses; every kernel leaves the locks at zero)."""
    index = device.index if device.index is not None else -1
    if index not in _buffers:
        workspace = torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device)
        _buffers[index] = (workspace, torch.zeros(MAX_TILES, dtype=torch.int32, device=device))
    return _buffers[index]

"""Run benchmarks/gpu_engine.py with one variant of the engine's GPU kernels (an A/B's one side).

    python scripts/engine_variant.py VARIANT [gpu_engine.py arguments]

VARIANT: off (cuBLAS everywhere), all (every eligible projection, however its programs fill the
SMs' waves), plan (triton_skinny's own plan()), narrow (plan() with 32-column programs only: before
2026-11-30's sixth session it never took 64), rows16 (plan() for up to 16 rows of x only, as before
that session), unfused (plan(), but SiLU * up as its own kernel after the gate_up GEMM, as before
that session), cublaslt (plan(), with torch's preferred BLAS library set to cuBLASLt for what the
kernel leaves to F.linear: at B=128 cuBLAS runs 7B down at ~77% of the copy ceiling plus a split-K
reduce), nopdl (plan(), without programmatic dependent launch, layers/pdl.py, on by default since
the seventh session), chunks2 (plan(), the sampler's rows split for 2 programs an SM, as before
the seventh session, instead of 8), nogated (plan(), without gate_up's SiLU * up fused by
the skinny kernel where plan() leaves it to cuBLAS, 17-64 rows: triton_skinny.gated_rows_tile, on by
default since 2026-11-30's eighth session), swapped (plan(), and what it leaves to F.linear at 33-128
rows of x computed as W @ x^T then transposed back: benchmarks/cublas_forms_bench.py's "swapped"),
gated32 (plan(), and the Qwen2.5- and Qwen3-32B gate_up at up to 32 rows left to cuBLAS then
silu_and_mul, as before the ninth session's (256, 128, 3, 8) tile; the A/B that took it ran the
opposite way, commit 4ba0c0c: Qwen3-32B B=32 21.02 -> 20.21 ms, Qwen2.5-32B 19.66 -> 19.24),
unfusedqk (plan(), Qwen3's q/k RMSNorms as their own launches before the rotary + cache-write kernel,
as before the ninth session: triton_backend._fusable says no), ltdown (plan(), and down_proj at
33-128 rows of x on cuBLASLt instead of cuBLAS: the ninth session's cublas_forms_bench had 7B down
at 128 rows 42.6 vs 46.2 us, at 64 rows 38.0 vs 39.8, and cuBLASLt no better on the other shapes),
nosplit (plan(), without down_proj as K-split partial sums reduced by the next add-RMSNorm,
layers/split_k.py: cuBLAS's split-K GEMM and its reduce launch, as before the eleventh session),
pdlall (plan(), with programmatic dependent launch at every row count, as before the eleventh
session's pdl.ATTENTION_MAX_ROWS), pdl64 (plan(), PDL up to 64 rows for every kernel),
nodecoderotary (plan(), decode-only steps with the rotary + cache-write launch before decode
attention, as before the twelfth session took attention/triton_new_token.py by default),
swapped256 and lt256 (plan(), and what it leaves to F.linear at 129-256 rows of x as the swapped
product or on cuBLASLt: the twelfth session's profile had cuBLAS's gate_up at 192 rows at 2.9 TB/s
against 3.8 at 128).
Llama-3.1-8B's gated tile at 33-64 rows (taken in the tenth session) is A/B'd by nogated: that shape
has no other gated rows. One process per variant, so an A/B inside one device call compares the same machine.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import torch

from pdserve.layers import linear, pdl, split_k, triton_sampler, triton_skinny
from pdserve.layers.attention import triton_backend, triton_new_token

VARIANTS = {"off", "all", "plan", "narrow", "rows16", "unfused", "cublaslt", "nopdl", "chunks2", "nogated"}
VARIANTS |= {"swapped", "gated32", "unfusedqk", "ltdown", "nosplit", "pdlall", "pdl64", "nodecoderotary"}
VARIANTS |= {"swapped256", "lt256"}


def route_cublas_rows(form: Any, low: int = 33, high: int = 128, down_only: bool = False) -> None:
    """linear._product: what it leaves to cuBLAS at low-high rows of a 2-D x (of down-shaped weights
    only, K > 2N, with down_only) computed by form(plain, x, weight, bias) instead."""
    plain = linear._product

    def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: Any) -> torch.Tensor:
        down = weight.shape[1] > 2 * weight.shape[0]
        if tile is not None or not x.is_cuda or x.dim() != 2 or not low <= x.shape[0] <= high:
            return plain(x, weight, bias, tile)
        if down_only and not down:
            return plain(x, weight, bias, tile)
        return form(plain, x, weight, bias)

    linear._product = product  # type: ignore[assignment]


def swapped(plain: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T as (W @ x^T)^T, contiguous."""
    y = torch.mm(weight, x.t()).t().contiguous()
    return y if bias is None else y + bias


def on_cublaslt(plain: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product on cuBLASLt; graphs capture the kernel the library picked, so the switch costs
    host time at capture only."""
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return plain(x, weight, bias, None)  # type: ignore[no-any-return]
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")


def main() -> None:
    variant = sys.argv[1]
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {sorted(VARIANTS)}")
    triton_skinny.ENABLED = variant != "off"
    if variant == "all":
        triton_skinny.MIN_WAVE_FILL = 0.0
    if variant == "narrow":
        triton_skinny.WIDTHS = (32,)  # type: ignore[assignment]
    if variant == "rows16":
        triton_skinny.MAX_ROWS = 16
    if variant == "unfused":
        triton_skinny.FUSED_SILU = False
    if variant == "cublaslt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    if variant == "nopdl":
        pdl.ENABLED = False
    if variant == "chunks2":
        triton_sampler.PROGRAMS_PER_SM = 2
    if variant == "nogated":
        triton_skinny.GATED_ROWS_ON = False
    if variant == "swapped":
        route_cublas_rows(swapped)
    if variant == "swapped256":
        route_cublas_rows(swapped, 129, 256)
    if variant == "lt256":
        route_cublas_rows(on_cublaslt, 129, 256)
    if variant == "gated32":
        for shape in [(55296, 5120), (51200, 5120)]:
            triton_skinny.GATED_TILES[shape] = ((32, None), *triton_skinny.GATED_TILES[shape][1:])
    if variant == "ltdown":
        route_cublas_rows(on_cublaslt, down_only=True)
    if variant == "pdlall":
        pdl.MAX_ROWS = pdl.ATTENTION_MAX_ROWS = None
    if variant == "pdl64":
        pdl.MAX_ROWS = pdl.ATTENTION_MAX_ROWS = 64
    if variant == "nodecoderotary":
        triton_new_token.ENABLED = False
    if variant == "nosplit":
        split_k.ENABLED = False
    if variant == "unfusedqk":
        triton_backend._fusable = lambda qk_norm, dtype: qk_norm is None
    print(f"skinny variant {variant}: enabled={triton_skinny.ENABLED} min fill={triton_skinny.MIN_WAVE_FILL}")
    sys.argv = ["benchmarks/gpu_engine.py", *sys.argv[2:]]
    runpy.run_path("benchmarks/gpu_engine.py", run_name="__main__")


if __name__ == "__main__":
    main()

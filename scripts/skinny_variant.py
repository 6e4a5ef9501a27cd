"""Run benchmarks/gpu_engine.py with one choice of where the engine takes the Triton skinny GEMM.

    python scripts/skinny_variant.py VARIANT [gpu_engine.py arguments]

VARIANT: off (cuBLAS everywhere), all (every eligible projection, however its programs fill the
SMs' waves), plan (triton_skinny's own plan(): on Qwen2.5-32B it leaves o and down to cuBLAS),
four_stages (plan() with one-wave grids pipelined 4 deep instead of 3), rows32 (plan(), and the kernel
for 17-32 rows too). One process per variant, so an A/B inside one device call compares the same
machine.
"""

from __future__ import annotations

import runpy
import sys

import torch

from pdserve.layers import triton_skinny
from pdserve.layers.triton_skinny import Tile

VARIANTS = {"off", "all", "plan", "four_stages", "rows32"}


def _up_to_32_rows() -> None:
    """The kernel for 17-32 rows too, with the L2-cycled microbenchmark's best 32-row tiles (7B: o
    10.2 vs cuBLAS 11.1 us, gate_up 69.9 vs 71.9, down 37.3 vs 38.3;
    docs/bench/h200/skinny_gemm-rows-16-128-2026-11-30.json)."""
    planned = triton_skinny.tile_for

    def tile_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Tile | None:
        tile = planned(x, weight, bias)
        if tile is None or x.shape[0] <= 16:
            return tile
        one_wave = tile[1] == triton_skinny.ONE_WAVE[0]
        return (tile[0], 512, 4, tile[3]) if one_wave else (tile[0], 256, 3, tile[3])

    triton_skinny.MAX_ROWS = 32
    triton_skinny.tile_for = tile_for  # type: ignore[assignment]


def main() -> None:
    variant = sys.argv[1]
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {sorted(VARIANTS)}")
    triton_skinny.ENABLED = variant != "off"
    if variant == "all":
        triton_skinny.MIN_WAVE_FILL = 0.0
    if variant == "four_stages":  # plan(), one-wave grids pipelined 4 deep (the microbenchmark's best)
        triton_skinny.ONE_WAVE = (512, 4)
    if variant == "rows32":
        _up_to_32_rows()
    print(f"skinny variant {variant}: enabled={triton_skinny.ENABLED} min fill={triton_skinny.MIN_WAVE_FILL}")
    sys.argv = ["benchmarks/gpu_engine.py", *sys.argv[2:]]
    runpy.run_path("benchmarks/gpu_engine.py", run_name="__main__")


if __name__ == "__main__":
    main()

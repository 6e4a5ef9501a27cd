"""Run benchmarks/gpu_engine.py with one choice of where the engine takes the Triton skinny GEMM.

    python scripts/skinny_variant.py VARIANT [gpu_engine.py arguments]

VARIANT: off (cuBLAS everywhere), all (every eligible projection, however its programs fill the
SMs' waves), plan (triton_skinny's own plan(): on Qwen2.5-32B it leaves o and down to cuBLAS),
four_stages (plan() with one-wave grids pipelined 4 deep instead of 3). One process per variant, so
an A/B inside one device call compares the same machine.
"""

from __future__ import annotations

import runpy
import sys

from pdserve.layers import triton_skinny

VARIANTS = {"off", "all", "plan", "four_stages"}


def main() -> None:
    variant = sys.argv[1]
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {sorted(VARIANTS)}")
    triton_skinny.ENABLED = variant != "off"
    if variant == "all":
        triton_skinny.MIN_WAVE_FILL = 0.0
    if variant == "four_stages":  # plan(), one-wave grids pipelined 4 deep (the microbenchmark's best)
        triton_skinny.ONE_WAVE = (512, 4)
    print(f"skinny variant {variant}: enabled={triton_skinny.ENABLED} min fill={triton_skinny.MIN_WAVE_FILL}")
    sys.argv = ["benchmarks/gpu_engine.py", *sys.argv[2:]]
    runpy.run_path("benchmarks/gpu_engine.py", run_name="__main__")


if __name__ == "__main__":
    main()

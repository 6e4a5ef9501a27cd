"""Programmatic dependent launch (PDL; Hopper and later) for the decode step's Triton kernels, on by
default on sm_90 and later (PDSERVE_PDL=0 turns it off). Measured on one H200 (seventh session, A/B in
one call, 7B decode launched ahead): 4.14 -> 3.97 ms at batch 1, 5.03 -> 4.89 at 32, 6.81 -> 6.82 at
128 (docs/performance.md).

A kernel launched with it may be scheduled while the kernel before it on the stream still drains.
Its programs first wait (griddepcontrol.wait) until that kernel has finished and its writes are
visible, then let the next kernel be scheduled (griddepcontrol.launch_dependents): what overlaps is
the launch and ramp of one small kernel with the tail of the one before. A 7B decode step is ~280
kernels whose sum falls 0.12-0.15 ms short of the step time (docs/performance.md). Since every
kernel waits for the whole of the one before it, no kernel can read what an earlier one has not
finished writing, however many PDL launches follow each other; kernels launched without PDL (cuBLAS,
torch) keep plain stream order.

The decode-attention kernels ask for it over up to ATTENTION_MAX_ROWS rows only (the first dimension
of the tensor a launch site passes: tokens or sequences; MAX_ROWS, no limit, for the others). Eleventh
session, one H200, launched ahead, two rounds each: 7B with PDL off at every row count, B=64 5.56 vs
5.47 ms on, B=96 6.08 vs 6.13, B=128 6.48 vs 6.59 (docs/bench/h200/ab-nopdl-2026-12-01.log); PDL off
past 64 rows for every kernel, 7B B=96 6.11 vs 6.27, B=128 6.60 vs 6.75, but 32B B=96 26.65 vs 26.46
and B=128 28.8 vs 28.4 (ab-pdlall-2026-12-01.log); at B=128, PDL off past 64 rows for the attention
kernels only, 7B 6.64, 6.60 vs 6.73, 6.74 (every kernel: 6.56, 6.56), 32B 28.62, 28.95 vs 28.80,
28.94 (every kernel: 28.86, 29.00; ab-pdlattn-2026-12-01.log). So the attention kernels only.

Each kernel takes a `PDL` constexpr and calls `wait_prior(PDL)` before anything else; its launch site
passes `**launch_options(tensor)`. The module imports triton only where the kernels do (CUDA, or a
test that set TRITON_INTERPRET first); a CPU launch (the interpreter) never asks for PDL.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ENABLED = os.environ.get("PDSERVE_PDL", "1") != "0"
MIN_CAPABILITY = 9  # griddepcontrol: sm_90 and later
MAX_ROWS: int | None = None  # launches over more rows than this go without it (None: no limit)
ATTENTION_MAX_ROWS: int | None = 64  # the same for the decode-attention kernels (attention=True)


def launch_options(t: torch.Tensor, attention: bool = False) -> dict[str, bool]:
    """The PDL constexpr and launch option for a kernel launched on t's device over t.shape[0] rows."""
    limit = ATTENTION_MAX_ROWS if attention else MAX_ROWS
    few_rows = limit is None or t.shape[0] <= limit
    on = ENABLED and t.is_cuda and few_rows and _capability(t.device.index or 0) >= MIN_CAPABILITY
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def wait_prior(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
        """With PDL: wait until the kernel before has finished, then let the next one be scheduled."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

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


def launch_options(t: torch.Tensor) -> dict[str, bool]:
    """The PDL constexpr and launch option for a kernel launched on t's device."""
    on = ENABLED and t.is_cuda and _capability(t.device.index or 0) >= MIN_CAPABILITY
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

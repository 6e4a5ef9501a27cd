"""The device side of programmatic dependent launch (pdl.py): the wait every PDL kernel starts with.

This module imports triton: import it only where triton is chosen (CUDA, or a test that set
TRITON_INTERPRET first).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_prior(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """With PDL: wait until the kernel before has finished, then let the next one be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()

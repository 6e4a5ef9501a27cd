"""Programmatic dependent launch (PDL; Hopper and later): which launches ask for it.

A kernel launched with it may be scheduled while the kernel before it on the stream still drains.
Its programs first wait (griddepcontrol.wait) until that kernel has finished and its writes are
visible, then let the next kernel be scheduled (griddepcontrol.launch_dependents): what overlaps is
the launch and ramp of one small kernel with the tail of the one before. A decode step is a few
hundred small kernels whose sum falls short of the step time, and PDL recovers part of that gap
(docs/performance.md). Since every kernel waits for the whole of the one before it, no kernel can
read what an earlier one has not finished writing, however many PDL launches follow each other;
kernels launched without PDL (cuBLAS, torch) keep plain stream order.

Past a number of rows the overlap no longer pays: the decode-attention kernels ask for it over up to
`attention_max_rows` rows only (the first dimension of the tensor a launch site passes: tokens or
sequences), the others up to `max_rows` (the tuning file's values; the engine A/Bs behind them are in
docs/performance.md). `KernelConfig.pdl=off` turns it off for the model's kernels.

Each kernel takes a `PDL` constexpr and calls triton_pdl.wait_prior(PDL) before anything else; its
launch site passes `**launch_options(tensor, pdl)`. A CPU launch (the interpreter) never asks for PDL.
This module does not import triton.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MIN_CAPABILITY = 9  # griddepcontrol: sm_90 and later


@dataclass(frozen=True)
class Pdl:
    """When a launch asks for PDL: on, over at most this many rows (None: any number)."""

    enabled: bool = True
    max_rows: int | None = None
    attention_max_rows: int | None = None


ALWAYS = Pdl()  # wherever the device supports it, at any row count
OFF = Pdl(enabled=False)


def launch_options(t: torch.Tensor, pdl: Pdl = ALWAYS, attention: bool = False) -> dict[str, bool]:
    """The PDL constexpr and launch option for a kernel launched on t's device over t.shape[0] rows."""
    limit = pdl.attention_max_rows if attention else pdl.max_rows
    few_rows = limit is None or t.shape[0] <= limit
    on = pdl.enabled and t.is_cuda and few_rows and _capability(t.device.index or 0) >= MIN_CAPABILITY
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]

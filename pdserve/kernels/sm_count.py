"""How many streaming multiprocessors a device has: the kernels size their grids in waves of them."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 16 elsewhere (Triton's interpreter: any number gives correct results)."""
    if device.type != "cuda":
        return 16
    return int(torch.cuda.get_device_properties(device).multi_processor_count)

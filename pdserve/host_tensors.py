"""Host lists to tensors and back, fast: the host side of every step sits between GPU steps.

`torch.tensor(list_of_lists)` walks every element through Python objects, several times slower for
the block tables of a large decode batch than packing the ints into an `array` and viewing it with
`torch.frombuffer`, which long_tensor and padded_rows do.

To a GPU, inputs go through pinned memory with a non-blocking copy: a plain `.to("cuda")` of pageable
memory synchronizes the stream, so the host would wait for the step already running before it could
queue the next one (and a step launched ahead, engine/ahead.py, would gain nothing). Results come
back the same way: pinned copies and an event (to_host_later). Used by the engine, the layers and
the kernels alike, so it imports none of them.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Sequence

import torch


def long_tensor(values: Sequence[int]) -> torch.Tensor:
    """A CPU int64 tensor of `values` (it keeps its own buffer alive)."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def padded_rows(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """[len(rows), width] int64, each row padded with zeros (block 0: never read past a row's length)."""
    flat: list[int] = []
    for row in rows:
        flat.extend(row)
        if len(row) < width:
            flat.extend([0] * (width - len(row)))
    return long_tensor(flat).view(len(rows), width)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. To a GPU: staged in pinned memory and queued behind the work already on the
    stream, without waiting for it (the caching host allocator keeps the staging block until the copy
    has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def list_on(
    values: list[int] | list[float], device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A small host list on `device` without waiting for the work queued there."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def to_host_later(tensors: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
    """Queue copies of device tensors to pinned host memory right behind the work that makes them;
    the call returned waits for those copies only (its event), not for work queued after them, as a
    `.tolist()` at that time would. CPU tensors come back as they are."""
    if not tensors or not tensors[0].is_cuda:
        return lambda: tensors
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors, strict=True):
        host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[torch.Tensor]:
        copied.synchronize()
        return hosts

    return wait

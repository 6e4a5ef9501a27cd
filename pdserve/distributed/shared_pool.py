"""How a tensor-parallel worker hands its KV pool to rank 0, so rank 0 alone can move whole blocks.

A disaggregated instance's connector runs on rank 0 and reads (prefill) or writes (decode) every KV
head of a block (pdserve.disagg.transport.shards). The workers allocate their pools where rank 0 can
map them: shared memory on CPU (the tensor itself crosses the pipe, by torch.multiprocessing's
handles), a CUDA IPC handle on GPUs (opened on rank 0's own GPU with peer access, as the cuda_ipc KV
path opens a decode pool). Rank 0 reads a block's KV only after the step that computed it returned on
every rank, and writes only blocks no step reads before the transfer is complete, so no other
synchronisation is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.multiprocessing  # noqa: F401 - registers the reductions that pickle shared tensors


def pool_handle(pool: torch.Tensor) -> Any:
    """What a worker sends to rank 0 for its pool (a CPU pool must be in shared memory already)."""
    if pool.is_cuda:
        from pdserve.disagg.transport.cuda_ipc import export_pool

        return {"cuda_ipc": export_pool(pool)}
    if not pool.is_shared():
        raise ValueError("a CPU KV pool must be in shared memory to be handed to rank 0")
    return pool


def ipc_export(handle: Any) -> dict[str, Any] | None:
    """The CUDA IPC export inside a worker's handle (what cuda_ipc peers open too); None on CPU."""
    return handle["cuda_ipc"] if isinstance(handle, dict) else None


def open_handle(handle: Any, device: torch.device) -> torch.Tensor:
    """Rank 0: the worker's pool, usable on `device` (rank 0's)."""
    info = ipc_export(handle)
    if info is None:
        return handle
    from pdserve.disagg.transport.cuda_ipc import open_pool

    return open_pool(info, device, in_process=False)

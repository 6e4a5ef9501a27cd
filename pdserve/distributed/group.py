"""The tensor-parallel process group: its rank, size and device, and the collectives the layers call.

At size 1 every collective returns its input untouched and no process group exists. Above, a standalone
c10d backend (NCCL on CUDA, Gloo on CPU) is built over a TCPStore on 127.0.0.1; nothing is registered
with torch.distributed's global state, so one process may hold several groups (one per engine) in turn.
Collectives are issued on the current stream and so can be captured in CUDA graphs.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)  # a hung (not dead) rank fails the step after this


def rank_device(spec: str, rank: int, size: int) -> torch.device:
    """Rank r runs on the r-th GPU after the one `spec` names ("cuda" = cuda:0); tp=1 keeps `spec` as is."""
    device = torch.device(spec)
    if device.type != "cuda" or size == 1:
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class TPGroup:
    """One rank's view of the group; `backend` is None at size 1."""

    def __init__(self, rank: int, size: int, device: torch.device, backend: Any = None) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.backend = backend  # a c10d ProcessGroupNCCL / ProcessGroupGloo

    @classmethod
    def single(cls, device: torch.device | None = None) -> TPGroup:
        return cls(0, 1, device or torch.device("cpu"))

    @classmethod
    def connect(cls, store: dist.Store, rank: int, size: int, device: torch.device) -> TPGroup:
        """Join the group (blocks until every rank has joined)."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = COLLECTIVE_TIMEOUT
            backend: Any = dist.ProcessGroupNCCL(store, rank, size, opts)
            backend.eager_connect_single_device(device)
        else:
            gloo: Any = dist.ProcessGroupGloo
            opts_gloo = gloo._Options()
            opts_gloo._devices = [gloo.create_device(hostname="127.0.0.1")]  # one host: loopback
            opts_gloo._timeout = COLLECTIVE_TIMEOUT
            backend = gloo(store, rank, size, opts_gloo)
        return cls(rank, size, device, backend)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.backend is not None:
            self.backend.allreduce([x]).wait()
        return x

    def all_gather_cols(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """[rows, widths[rank]] on each rank -> [rows, sum(widths)], the ranks' columns side by side."""
        if self.backend is None:
            return x
        width = max(widths)
        if x.shape[-1] < width:
            x = F.pad(x, (0, width - x.shape[-1]))
        out = x.new_empty((self.size * x.shape[0], width))
        self.backend._allgather_base(out, x.contiguous()).wait()
        parts = out.view(self.size, x.shape[0], width)
        if all(w == width for w in widths):
            return parts.permute(1, 0, 2).reshape(x.shape[0], self.size * width)
        return torch.cat([parts[r, :, :w] for r, w in enumerate(widths)], dim=-1)

    def all_min(self, value: int) -> int:
        """The smallest `value` over ranks (every rank gets it)."""
        if self.backend is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts: Any = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.backend.allreduce([t], opts).wait()
        return int(t.item())

    def close(self) -> None:
        """Tear the group down. NCCL: only once no CUDA graph holding one of its collectives is left."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        try:
            if self.device.type == "cuda":
                backend.abort()
            else:
                backend.shutdown()
        except Exception:  # the group is going away either way
            logger.warning("closing the tensor-parallel group failed", exc_info=True)

    def abandon(self) -> None:
        """Let go of the group without tearing it down, for when that could block: NCCL's teardown
        waits for CUDA graphs that captured its collectives and for peers that may be dead. The
        backend is then never destroyed (its destructor would tear it down); the process's exit
        frees it."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        if self.device.type == "cuda":
            keep_forever(backend)
        else:
            backend.shutdown()  # Gloo never blocks on teardown


def keep_forever(obj: object) -> None:
    """Make `obj` immortal: its destructor, which could block forever, never runs; process exit frees it."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))

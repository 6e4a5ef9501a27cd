"""KV blocks in motion: what a transport reads from the sender's pool and writes into the receiver's.

    pool: [layers, 2 (k, v), num_blocks, block_size, kv_heads, head_dim] (block-major memory)
    payload of n blocks: [n, layers, 2, block_size, kv_heads, head_dim], contiguous (the wire order)

`KVBlocks` names source blocks of the local pool; every transport materialises them its own way
(`to_host` for byte transports, `gather` for NCCL, block-run copies for CUDA IPC) and calls `on_read`
exactly once when it no longer reads them, so the connector can keep them from reuse until then.
`write_blocks` puts a received payload into reserved blocks. Copies on CUDA run on one side stream per
device (the only module-level state here) and are waited for with an event, never a device-wide sync.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.disagg.transport.shards import ShardedPool
from pdserve.kv_layout import block_major


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream this process uses for KV copies on `device` (one per device, made on first use)."""
    return torch.cuda.Stream(device=device)


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer (from torch's caching host allocator): fast, asynchronous H2D and D2H.
    Plain memory where there is no GPU (a tensor-parallel CPU pool takes bytes through one too)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


def pool_block_bytes(pool: torch.Tensor, shards: ShardedPool | None = None) -> int:
    """Bytes of one block on the wire: all layers, K and V, every KV head (all ranks' with `shards`)."""
    if shards is not None:
        return shards.block_bytes
    return pool[:, :, 0].numel() * pool.element_size()


def paired_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Split a block mapping into runs contiguous on both sides: (src_start, dst_start, length)."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


@dataclass
class KVBlocks:
    """Source blocks of a local pool, all layers, K and V, to be moved to a peer."""

    pool: torch.Tensor  # [layers, 2, blocks, block_size, heads, dim]
    block_ids: list[int]
    on_read: Callable[[], None] = lambda: None  # called once the transport no longer reads the blocks
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the engine computed this KV
    shards: ShardedPool | None = None  # tensor parallel: every rank's part (pool is rank 0's)
    streamed: bool = False  # every layer already copied by a direct path (disagg/layer_stream.py)
    _read: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(
        cls,
        pool: torch.Tensor,
        block_ids: list[int],
        on_read: Callable[[], None],
        shards: ShardedPool | None = None,
    ) -> KVBlocks:
        ready = None
        if pool.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(pool.device))
        return cls(pool, list(block_ids), on_read, ready, shards)

    @property
    def block_bytes(self) -> int:
        return pool_block_bytes(self.pool, self.shards)

    @property
    def nbytes(self) -> int:
        return len(self.block_ids) * self.block_bytes

    def done(self) -> None:
        """The transport has finished reading (or gave up): idempotent."""
        with self._lock:
            first, self._read = not self._read, True
        if first:
            self.on_read()

    def gather(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Blocks [start, end) as one contiguous payload on the pool's device, enqueued on the current
        stream (which first waits for the KV to be computed); the caller synchronises as it needs."""
        ids = self.block_ids[start:end]
        if self.ready is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(self.ready)
        if self.shards is not None:
            return self.shards.gather(ids, self.pool.device)  # every KV head, from every rank
        index = torch.tensor(ids, device=self.pool.device)
        return block_major(self.pool).index_select(0, index)  # [n, layers, 2, block_size, heads, dim]

    def gather_now(self) -> torch.Tensor:
        """All blocks gathered and finished (a side stream and its event on CUDA); then `done`."""
        try:
            if not self.pool.is_cuda:
                return self.gather()
            stream = copy_stream(self.pool.device)
            with torch.cuda.stream(stream):
                out = self.gather()
            stream.synchronize()
            return out
        finally:
            self.done()

    def to_host(self) -> np.ndarray:
        """The payload as host bytes: a view of the gathered blocks on CPU, a pinned copy from CUDA."""
        try:
            if not self.pool.is_cuda:
                return self.gather().view(torch.uint8).numpy().reshape(-1)
            stream = copy_stream(self.pool.device)
            host = pinned_bytes(self.nbytes)
            with torch.cuda.stream(stream):
                host.copy_(self.gather().view(torch.uint8).reshape(-1), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
            done.synchronize()
            return host.numpy()
        finally:
            self.done()


def as_payload_tensor(payload: memoryview | torch.Tensor) -> torch.Tensor:
    """Received bytes (a host buffer or a tensor of any dtype) as a flat uint8 tensor, without copying."""
    if isinstance(payload, torch.Tensor):
        return payload.reshape(-1).view(torch.uint8)
    return torch.frombuffer(payload, dtype=torch.uint8)


def write_blocks(
    pool: torch.Tensor,
    block_ids: list[int],
    payload: memoryview | torch.Tensor,
    shards: ShardedPool | None = None,
) -> None:
    """Write a payload of len(block_ids) blocks into those blocks of `pool` (of every rank's part, with
    `shards`); complete on return."""
    heads = shards.num_heads if shards is not None else pool.shape[4]
    src = as_payload_tensor(payload).view(pool.dtype)
    src = src.view(len(block_ids), *pool.shape[:2], pool.shape[3], heads, pool.shape[5])
    if not pool.is_cuda:
        _put(pool, block_ids, src.cpu(), shards)
        return
    stream = copy_stream(pool.device)
    with torch.cuda.stream(stream):
        _put(pool, block_ids, src.to(pool.device, non_blocking=True), shards)
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()


def _put(pool: torch.Tensor, block_ids: list[int], src: torch.Tensor, shards: ShardedPool | None) -> None:
    """Enqueue the copy of a payload [n, layers, 2, ...] on `pool`'s device into blocks `block_ids`."""
    if shards is not None:
        shards.write(block_ids, src)
    else:
        block_major(pool).index_copy_(0, torch.tensor(block_ids, device=pool.device), src)

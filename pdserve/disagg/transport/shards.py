"""A KV pool split by KV heads over tensor-parallel ranks, as rank 0 sees it, for moving whole blocks.

With `--tp N` every rank holds the KV heads of its own attention heads: rank r's pool is
[layers, 2, blocks, block_size, heads_r, head_dim] with the same block ids on every rank. Rank 0 opens
the workers' pools (shared memory on CPU, CUDA IPC on GPUs: pdserve.distributed.shared_pool), so the
connector can read and write all of a block's KV without the workers taking part. On the wire a block
always carries every KV head in order, whatever either side's tensor parallelism: a prefill at TP 2
hands over to a decode at TP 1, 2 or 4 alike. Where TP exceeds the model's KV heads, ranks hold copies
of one head: a gather reads one copy, a write fills them all.

On GPUs the same picture serves the cuda_ipc path across instances: the decode side offers every
rank's IPC handle (`ipc`), the prefill side opens them as a ShardedPool of its own and copies each
block run straight from its shards into theirs, head range by head range (`head_copies`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.kv_layout import block_major


@dataclass(frozen=True)
class ShardedPool:
    tensors: list[torch.Tensor]  # per rank: [layers, 2, blocks, block_size, heads_r, head_dim]
    starts: list[int]  # the first KV head of each rank's shard
    num_heads: int  # the model's KV heads
    # per rank, the CUDA IPC export its tensor was opened from (cuda_ipc.export_pool); None: our own
    ipc: list[dict[str, Any] | None] | None = None
    # (shard, first head of it to read, heads to read, model head of that first): every head once, in
    # order; made from the above
    pieces: list[tuple[torch.Tensor, int, int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces: list[tuple[torch.Tensor, int, int, int]] = []
        covered = 0
        for start, tensor in sorted(zip(self.starts, self.tensors, strict=True), key=lambda x: x[0]):
            if start > covered:
                raise ValueError(f"KV heads {covered}..{start - 1} are in no shard")
            end = start + tensor.shape[4]
            if end > covered:  # a copy of heads already covered adds nothing to read
                pieces.append((tensor, covered - start, end - covered, covered))
                covered = end
        if covered != self.num_heads:
            raise ValueError(f"the shards hold {covered} KV heads, the model has {self.num_heads}")
        object.__setattr__(self, "pieces", pieces)

    @property
    def block_bytes(self) -> int:
        """One block, all layers, K and V, every KV head once."""
        t = self.tensors[0]
        return t.shape[0] * 2 * t.shape[3] * self.num_heads * t.shape[5] * t.element_size()

    def gather(self, block_ids: list[int], device: torch.device) -> torch.Tensor:
        """[n, layers, 2, block_size, num_heads, head_dim] on `device` (the wire order), enqueued on
        the current stream."""
        parts = []
        for tensor, offset, count, _ in self.pieces:
            index = torch.tensor(block_ids, device=tensor.device)
            part = block_major(tensor).index_select(0, index)[:, :, :, :, offset : offset + count]
            parts.append(part.to(device, non_blocking=True))
        return torch.cat(parts, dim=4)

    def write(self, block_ids: list[int], src: torch.Tensor) -> None:
        """Put a full-heads payload [n, layers, 2, block_size, num_heads, head_dim] into every shard's
        blocks (enqueued on the current stream; the caller waits as it needs)."""
        for start, tensor in zip(self.starts, self.tensors, strict=True):
            index = torch.tensor(block_ids, device=tensor.device)
            part = src[:, :, :, :, start : start + tensor.shape[4]].to(tensor.device, non_blocking=True)
            block_major(tensor).index_copy_(0, index, part)

    @classmethod
    def whole(cls, pool: torch.Tensor) -> ShardedPool:
        """A pool that is not split: one shard with every head."""
        return cls([pool], [0], pool.shape[4])


HeadCopy = tuple[torch.Tensor, slice, torch.Tensor, slice]  # (dst shard, its heads, src shard, its heads)


def head_copies(dst: ShardedPool, src: ShardedPool) -> list[HeadCopy]:
    """What moving whole blocks from `src` into `dst` takes: for every shard of dst (each copy of a
    head too), the heads it shares with each of src's pieces, as head ranges of both shard tensors."""
    if dst.num_heads != src.num_heads:
        raise ValueError(f"KV heads differ: {src.num_heads} here, {dst.num_heads} there")
    copies: list[HeadCopy] = []
    for dst_start, dst_tensor in zip(dst.starts, dst.tensors, strict=True):
        dst_end = dst_start + dst_tensor.shape[4]
        for src_tensor, offset, count, first in src.pieces:
            lo, hi = max(dst_start, first), min(dst_end, first + count)
            if lo < hi:
                src_heads = slice(offset + lo - first, offset + hi - first)
                copies.append((dst_tensor, slice(lo - dst_start, hi - dst_start), src_tensor, src_heads))
    return copies


def copy_run(copies: list[HeadCopy], src_block: int, dst_block: int, count: int) -> None:
    """Enqueue the copy of blocks [src_block, +count) into [dst_block, +count), every layer, K and V
    (one contiguous memcpy per shard pair where both hold the same whole heads)."""
    for dst_tensor, dst_heads, src_tensor, src_heads in copies:
        theirs = block_major(dst_tensor)[dst_block : dst_block + count, :, :, :, dst_heads]
        ours = block_major(src_tensor)[src_block : src_block + count, :, :, :, src_heads]
        theirs.copy_(ours, non_blocking=True)

"""A KV pool split by KV heads over tensor-parallel ranks, as rank 0 sees it, for moving whole blocks.

With `--tp N` every rank holds the KV heads of its own attention heads: rank r's pool is
[layers, 2, blocks, block_size, heads_r, head_dim] with the same block ids on every rank. Rank 0 opens
the workers' pools (shared memory on CPU, CUDA IPC on GPUs: pdserve.distributed.shared_pool), so the
connector can read and write all of a block's KV without the workers taking part. On the wire a block
always carries every KV head in order, whatever either side's tensor parallelism: a prefill at TP 2
hands over to a decode at TP 1, 2 or 4 alike. Where TP exceeds the model's KV heads, ranks hold copies
of one head: a gather reads one copy, a write fills them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.kv_layout import block_major


@dataclass(frozen=True)
class ShardedPool:
    tensors: list[torch.Tensor]  # per rank: [layers, 2, blocks, block_size, heads_r, head_dim]
    starts: list[int]  # the first KV head of each rank's shard
    num_heads: int  # the model's KV heads
    # (shard, first head of it to read, heads to read): every head once, in order; made from the above
    pieces: list[tuple[torch.Tensor, int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces: list[tuple[torch.Tensor, int, int]] = []
        covered = 0
        for start, tensor in sorted(zip(self.starts, self.tensors, strict=True), key=lambda x: x[0]):
            if start > covered:
                raise ValueError(f"KV heads {covered}..{start - 1} are in no shard")
            end = start + tensor.shape[4]
            if end > covered:  # a copy of heads already covered adds nothing to read
                pieces.append((tensor, covered - start, end - covered))
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
        for tensor, offset, count in self.pieces:
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

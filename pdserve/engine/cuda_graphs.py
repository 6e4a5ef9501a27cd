"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed with the step's inputs.

A decode step launches a few hundred small kernels; on a GPU their launch time exceeds their run time at
small batches. Each bucket (1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs) is captured once at start:
the forward pass and the logits of a padded batch, reading static input buffers. A step of b decodes
copies its inputs into the first b rows, pads the rest (slot -1: their K/V are not written; context
length 0: their output is zeros), replays the smallest bucket that holds it and reads b rows of logits.

Needs an attention backend whose decode path reads only device tensors (the Triton backend); the torch
backend is never captured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pdserve.host_tensors import long_tensor, padded_rows
from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_batch + 1, 8))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


@dataclass
class DecodeInputs:
    """One decode step on the host: token, position, KV slot, context length and block table per row."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]


class StagingRows:
    """Pinned host rows a step's inputs are written into before one copy to the graphs' buffers, and
    the event recorded behind that copy (on CPU, plain memory and no event)."""

    def __init__(self, n: int, max_blocks_per_seq: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.rows = torch.zeros((4, n), dtype=torch.long, pin_memory=pin)
        self.rows[2] = -1
        self.tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.long, pin_memory=pin)
        self.copied = torch.cuda.Event() if pin else None

    def wait_copied(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def record_copied(self) -> None:
        if self.copied is not None:
            self.copied.record()


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        dev = kv_caches[0].device
        n = self.buckets[-1]
        # ids, positions, slots and context lengths: rows of one buffer, filled by one copy a step
        self.rows = torch.zeros((4, n), dtype=torch.long, device=dev)
        self.rows[2] = -1
        self.ids, self.pos, self.slots, self.seq_lens = self.rows.unbind(0)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.long, device=dev)
        # Host staging: two sets, used in turn, each with the event its last copy recorded. A step is
        # queued while the previous one may not have started (ahead.py), so a set is rewritten only
        # once the copy that read it has run (nearly always already: the event is two steps old).
        self.host = [StagingRows(n, max_blocks_per_seq, dev) for _ in range(2)]
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b],
            block_tables=self.tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=list(range(b + 1)),
            query_start_loc_t=self.query_start[: b + 1],
            context_lens=[self.block_size * self.tables.shape[1]] * b,  # an upper bound, host side only
            num_decodes=b,
            block_size=self.block_size,
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.ids[:b], self.pos[:b], self.kv_caches, self._meta(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                self._forward(b)  # compile and autotune outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[b] = self._forward(b)
                self.graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def run(self, step: DecodeInputs, ahead: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the smallest bucket that holds the step; returns [b, vocab] logits. `ahead`: device
        input ids of the first rows, copied over the host's (a device-to-device copy, no wait)."""
        b = len(step.token_ids)
        bucket = next(s for s in self.buckets if s >= b)
        staging = self.host[self.turn]
        self.turn ^= 1
        staging.wait_copied()
        host, host_tables = staging.rows, staging.tables
        host[:, b:bucket] = 0
        host[2, b:bucket] = -1
        host[:4, :b] = long_tensor(step.token_ids + step.positions + step.slots + step.seq_lens).view(4, b)
        width = max(len(t) for t in step.block_tables)
        # packed [bucket, width] at the start of the pinned buffer: a strided host slice would make
        # torch stage it through a pageable copy (the device side is strided either way)
        packed = host_tables.view(-1)[: bucket * width].view(bucket, width)
        packed[b:] = 0
        packed[:b] = padded_rows(step.block_tables, width)
        self.rows.copy_(host, non_blocking=True)  # whole rows: one contiguous copy (8 B x 4 x max batch)
        if ahead is not None:
            self.ids[: ahead.numel()].copy_(ahead)
        self.tables[:bucket, :width].copy_(packed, non_blocking=True)
        staging.record_copied()
        self.graphs[bucket].replay()
        return self.logits[bucket][:b]

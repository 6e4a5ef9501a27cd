"""What attention needs to know about one step's flattened batch.

Tokens of all scheduled requests are laid end to end, decodes first:

    tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1]     d = one decode token, p = a prompt chunk
    seq:       0  1  2    3             4
    query_start_loc = [0, 1, 2, 3, 7, 9]       seq_lens = context length after this step

slot_mapping[t] = block_id * block_size + offset: where token t's K and V are written in the pool.

Device-side kernels (the Triton backend) read `query_start_loc_t`, the same offsets as an int32 tensor on
the device; when it is left None the first layer's backend copies the host list over and stores it here
(one small host-to-device copy per step; a runner that captures CUDA graphs must fill it itself).
For a CUDA-graph decode batch padded to a fixed size, padded entries have seq_len 0 (their output is
zeros) and slot -1 (nothing is written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64: tokens of context after this step
    query_start_loc: list[int]  # num_seqs + 1 offsets into the flattened tokens
    context_lens: list[int]  # host copy of seq_lens
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    block_size: int
    query_start_loc_t: torch.Tensor | None = None  # [num_seqs + 1] int32 on the device
    # called with i once layer i's kernels (its KV written to the cache included) are queued: layer-wise
    # KV streaming (disagg/layer_stream.py); eager steps only, never in a CUDA graph
    after_layer: Callable[[int], None] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


def one_prompt(num_tokens: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """The metadata of one prompt of `num_tokens` computed whole into blocks 0, 1, ... of a pool (a
    calibration or quality pass over a fixed text, outside the scheduler)."""
    blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        block_tables=torch.arange(blocks, device=device)[None, :],
        seq_lens=torch.tensor([num_tokens], device=device),
        query_start_loc=[0, num_tokens],
        context_lens=[num_tokens],
        num_decodes=0,
        block_size=block_size,
    )

"""What rank 0 sends its tensor-parallel workers: how to build their shard once, then each step's inputs.

A step is sent as it is described on the host (token ids, positions, KV slots, block tables), before
rank 0 runs it; every rank then builds the same device tensors and runs the same forward pass. A decode
step replayed in a CUDA graph travels as `DecodeInputs` (pdserve.engine.cuda_graphs); `None` means stop.

The worker builds its rank's runner through a factory rank 0 gives it (the engine's ModelRunner, bound
to its configs), so this package never imports the engine that uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pdserve.distributed.group import TPGroup


@dataclass
class StepInputs:
    """One eager step, flattened (decodes first): see pdserve.layers.attention.metadata."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # padded to one width with block 0
    num_decodes: int
    logit_rows: list[int]  # token rows whose logits are computed (the last of each sampling chunk)


class RankRunner(Protocol):
    """What a worker needs of the runner it builds: its KV pool, a step, and a way to release it."""

    kv_cache: torch.Tensor

    def run_step(self, step: Any) -> object: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its shard of the model and its KV pool."""

    rank: int
    size: int
    store_port: int
    parent_pid: int
    num_threads: int
    log_level: int
    device: str  # rank 0's device spec; rank r runs on the r-th GPU after it
    share_pool: bool  # send the KV pool to rank 0 once built (CacheConfig.share_pool)
    build_runner: Callable[[TPGroup], RankRunner]  # picklable: e.g. a partial over the runner's class

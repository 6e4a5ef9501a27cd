"""What rank 0 sends its tensor-parallel workers: how to build their shard once, then each step's inputs.

A step is sent as it is described on the host (token ids, positions, KV slots, block tables), before
rank 0 runs it; every rank then builds the same device tensors and runs the same forward pass. A decode
step replayed in a CUDA graph travels as `DecodeInputs` (pdserve.engine.cuda_graphs); `None` means stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.config import CacheConfig, ModelConfig, SchedulerConfig
from pdserve.kernels.config import KernelConfig


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


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its shard of the model and its KV pool."""

    rank: int
    size: int
    store_port: int
    parent_pid: int
    num_threads: int
    log_level: int
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    hf_config: Any  # transformers' PretrainedConfig (picklable)
    kernels: KernelConfig

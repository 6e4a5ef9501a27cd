"""The model runner: owns the device, the model weights and the KV cache tensors; runs one step.

KV cache layout, one tensor for the whole pool:

    kv_cache: [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]

a view of block-major memory (kv_layout.py): a run of blocks, all layers, is one contiguous range,
the unit of a KV transfer. The runner knows nothing of scheduling or text.

With tensor parallelism (pdserve.distributed) this runner is rank 0: it holds its shard of the model and
of the KV heads, sends each step to the worker ranks before running it, and alone samples.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from pdserve.config import CacheConfig, ModelConfig, SchedulerConfig
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.distributed.driver import TPDriver
from pdserve.distributed.group import TPGroup
from pdserve.distributed.messages import StepInputs
from pdserve.distributed.sharding import model_head_shard
from pdserve.distributed.shared_pool import ipc_export, open_handle
from pdserve.engine import kv_scales
from pdserve.engine.cuda_graphs import DecodeGraphs, DecodeInputs
from pdserve.engine.memory_profile import profile_kv_bytes
from pdserve.engine.sampler import DeferredSample, PendingSample, Sampler, SampleResult
from pdserve.engine.scheduler import ScheduledChunk
from pdserve.engine.warmup import warm_sampler, warmup_steps
from pdserve.host_tensors import long_tensor, padded_rows, to_device
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.factory import build_kernels
from pdserve.kv_layout import allocate_kv_pool
from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.layers.attention.registry import backend_class
from pdserve.models.llama import head_dim_of
from pdserve.models.loader import build_model
from pdserve.structured.masks import constrained_rows

logger = logging.getLogger(__name__)

# The CPU pool, unless told: as many bytes as the weights, at least one max_model_len sequence, at most
# this. A CPU step streams every weight once and every cached token of its batch once, so a full pool
# the size of the weights makes a step at most about twice a weight-only one: a bigger pool would be
# served ever more slowly rather than faster (and the 135M default model in fp32 then takes ~0.5 GiB
# of KV per instance instead of 1 GiB).
MAX_CPU_KV_BYTES = 1 << 30


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make `device` the current CUDA device for a block: Triton launches on the current device, so a
    runner on cuda:1 in a process whose current device is cuda:0 must switch (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def kv_dtype(cache: CacheConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's element type: the model's, or e4m3 for --kv-cache-dtype fp8 (attention widens it
    on read: layers/attention/torch_backend.py, kernels/attention/triton_tile.py)."""
    return torch.float8_e4m3fn if cache.kv_cache_dtype == "fp8" else model_dtype


@dataclass(frozen=True)
class KVLayout:
    """The shape of the pool; two peers exchanging KV must agree on it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:  # all layers, K and V
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        hf_config: Any,
        scheduler_config: SchedulerConfig | None = None,
        tp: TPGroup | None = None,  # given: this is worker rank tp.rank; None: rank 0, starting the workers
        kernels: KernelConfig | None = None,
    ) -> None:
        self.model_config = model_config
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.driver: TPDriver | None = None
        if tp is None and model_config.tensor_parallel_size > 1:
            rank_runner = partial(
                ModelRunner, model_config, cache_config, hf_config, self.scheduler_config, kernels=kernels
            )
            self.driver = TPDriver.launch(model_config, cache_config, hf_config, rank_runner)
            tp = self.driver.group
        self.tp = tp or TPGroup.single(torch.device(model_config.device))
        self.device = self.tp.device
        self.kernels = build_kernels(kernels or KernelConfig(), self.device)  # the model's one choice
        self.sampler = Sampler.for_device(kernels or KernelConfig(), self.device)
        with on_device(self.device):
            self._build(model_config, cache_config, hf_config)
        self.kv_shards = self._open_shards(hf_config) if cache_config.share_pool else None

    def _open_shards(self, hf_config: Any) -> ShardedPool | None:
        """Rank 0 of a tensor-parallel group: every rank's KV pool, for the connector (None at TP 1)."""
        if self.driver is None:
            return None
        handles = self.driver.worker_pools()
        tensors = [self.kv_cache] + [open_handle(h, self.device) for h in handles]
        starts = [model_head_shard(hf_config, self.tp.size, r).kv_start for r in range(self.tp.size)]
        ipc: list[dict[str, Any] | None] = [None]  # rank 0's own pool: exported when a peer asks
        ipc += [ipc_export(h) for h in handles]
        return ShardedPool(tensors, starts, int(hf_config.num_key_value_heads), ipc)

    def _build(self, model_config: ModelConfig, cache_config: CacheConfig, hf_config: Any) -> None:
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        torch.manual_seed(model_config.seed)
        self.model = build_model(
            hf_config,
            model_config.path,
            self.kernels,
            self.dtype,
            self.device,
            model_config.load_format,
            model_config.seed,
            self.tp,
            model_config.quantization,
        )
        self.layout = KVLayout(
            hf_config.num_hidden_layers,
            model_head_shard(hf_config, self.tp.size, self.tp.rank).kv_heads,
            head_dim_of(hf_config),
            cache_config.block_size,
            kv_dtype(cache_config, self.dtype),
        )
        lay = self.layout
        self.kv_scales = kv_scales.resolve(  # fp8 pool: the layers' scales, fixed from here on
            self.model, hf_config, model_config, cache_config,
            (lay.num_layers, lay.num_kv_heads, lay.head_dim), self.dtype, self.tp,
        )  # fmt: skip
        model_len = model_config.max_model_len or int(hf_config.max_position_embeddings)
        self.num_blocks = self.tp.all_min(self._pool_blocks(cache_config, model_len))  # same on every rank
        graph_safe = backend_class(self.kernels).cuda_graph_safe
        use_graphs = self.device.type == "cuda" and not model_config.enforce_eager and graph_safe
        shape = (lay.num_layers, self.num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
        self.kv_cache = allocate_kv_pool(*shape, lay.dtype, self.device)  # block-major memory
        if cache_config.share_pool and self.device.type == "cpu":
            self.kv_cache.share_memory_()  # before any view of it: rank 0 maps it (shared_pool.py)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.graphs = self._capture_graphs(hf_config) if use_graphs else None
        if self.driver is not None and self.graphs is not None:
            self.driver.keep_if_failed(self.graphs)  # a rank lost mid-collective: destroying them would block
        if self.device.type == "cuda" and self.tp.rank == 0:
            logits = None
            for step in warmup_steps(lay.block_size, self.num_blocks):
                logits = self._run_all_ranks(step)
            if logits is not None:
                warm_sampler(self.sampler, logits)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_blocks,
            lay.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 2**20,
        )

    def _pool_blocks(self, cache: CacheConfig, model_len: int) -> int:
        if cache.num_blocks is not None:
            return cache.num_blocks
        budget = cache.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            lay, sched = self.layout, self.scheduler_config
            budget = profile_kv_bytes(
                self.model,
                (lay.num_layers, 2, lay.block_size, lay.num_kv_heads, lay.head_dim),
                lay.dtype,
                self.device,
                sched.max_num_batched_tokens,
                sched.max_num_seqs,
                self.model_config.gpu_memory_utilization,
            )
        return max(2, (budget or self._cpu_kv_bytes(model_len)) // self.layout.bytes_per_block)

    def _cpu_kv_bytes(self, model_len: int) -> int:
        """The default CPU pool (MAX_CPU_KV_BYTES says why): this rank's weights' bytes, bounded."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        one_sequence = -(-model_len // self.layout.block_size) * self.layout.bytes_per_block
        return min(max(weights, one_sequence), MAX_CPU_KV_BYTES)

    def _capture_graphs(self, hf_config: Any) -> DecodeGraphs:
        model_len = self.model_config.max_model_len or int(hf_config.max_position_embeddings)
        max_blocks = min(-(-model_len // self.layout.block_size), self.num_blocks)
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.layout.block_size,
            self.scheduler_config.max_num_seqs,
            max_blocks,
        )
        graphs.capture()
        return graphs

    def close(self) -> None:
        """Drop the CUDA graphs, then stop the tensor-parallel workers (NCCL's teardown waits for the
        graphs that captured its collectives). The runner cannot run steps afterwards."""
        if self.graphs is not None and (self.driver is None or self.driver.healthy):
            self.graphs.graphs.clear()
        self.graphs = None
        if self.driver is not None:
            self.driver.close()

    def execute(self, chunks: list[ScheduledChunk]) -> list[SampleResult]:
        """Run the chunks (decodes first) through the model; sample for the chunks that reach the end.

        Returns one result per sampling chunk, in the order of `chunks`.
        """
        return self.launch(chunks).wait()

    @property
    def single_rank(self) -> bool:
        """No worker ranks: a step can take device input ids and an after-layer hook (launch)."""
        return self.driver is None  # worker ranks get host inputs only

    @torch.inference_mode()
    def launch(
        self,
        chunks: list[ScheduledChunk],
        ahead: torch.Tensor | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> PendingSample:
        """Queue a step (as execute); `wait()` on the result gives its tokens. On a GPU the host is
        free in between: the engine builds the previous step's outputs there. `ahead`: the input ids
        of the chunks (decodes whose token the previous step is still sampling, one a chunk); their
        penalties count those tokens on the device. Where a grammar still constrains a row, only the
        forward is queued: the engine releases the sampling once those tokens are on the host
        (sampler.DeferredSample).
        `after_layer`: see AttentionMetadata (called on eager steps only; single-rank runners)."""
        assert (ahead is None and after_layer is None) or self.single_rank
        graphs = self.graphs
        step: StepInputs | DecodeInputs
        if graphs is not None and len(chunks) <= graphs.max_batch and all(c.num_tokens == 1 for c in chunks):
            step = self._decode_inputs(chunks)
        else:
            step = self._step_inputs(chunks)
        with on_device(self.device):
            if ahead is not None or after_layer is not None:
                logits = self.run_step(step, ahead, after_layer)
            else:
                logits = self._run_all_ranks(step)
            rows = [i for i, c in enumerate(chunks) if c.samples]
            if logits is None or not rows:
                return PendingSample(None, lambda: [])
            if isinstance(step, DecodeInputs) and len(rows) < len(chunks):  # a graph computes every row
                logits = logits[to_device(long_tensor(rows), self.device)]
            assert ahead is None or len(rows) == len(chunks) == ahead.shape[0], "ahead: every row samples"
            requests = [chunks[i].request for i in rows]
            if ahead is not None and constrained_rows(requests):
                return DeferredSample(self.sampler, logits, requests)
            return self.sampler.sample_later(logits, requests, ahead)

    def _run_all_ranks(self, step: StepInputs | DecodeInputs) -> torch.Tensor | None:
        """Run a step on every rank (through the driver with tensor parallelism); rank 0's logits."""
        return self.driver.run(step, self.run_step) if self.driver else self.run_step(step)

    @torch.inference_mode()
    def run_step(
        self,
        step: StepInputs | DecodeInputs,
        ahead: torch.Tensor | None = None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor | None:
        """This rank's forward pass of one step: the logits of the sampling rows (None: no such row).
        `ahead`, `after_layer`: see launch."""
        if isinstance(step, DecodeInputs):
            assert self.graphs is not None
            return self.graphs.run(step, ahead)
        input_ids, positions, meta = self._device_inputs(step)
        meta.after_layer = after_layer
        if ahead is not None:  # decodes come first, one token each
            input_ids[: ahead.numel()].copy_(ahead)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
        if not step.logit_rows:  # a prompt chunk that does not reach the end: nothing to sample
            return None
        return self.model.compute_logits(hidden[to_device(long_tensor(step.logit_rows), self.device)])

    def _decode_inputs(self, chunks: list[ScheduledChunk]) -> DecodeInputs:
        bs = self.layout.block_size
        step = DecodeInputs([], [], [], [], [])
        for c in chunks:
            req, p = c.request, c.start
            step.token_ids.append(req.token_ids[p] if p < req.num_tokens else 0)  # else: an ahead chunk
            step.positions.append(p)
            step.slots.append(req.block_ids[p // bs] * bs + p % bs)
            step.seq_lens.append(p + 1)
            step.block_tables.append(req.block_ids)
        return step

    def _step_inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        bs = self.layout.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        ctx: list[int] = []
        for c in chunks:
            req, start, end = c.request, c.start, c.start + c.num_tokens
            ids.extend(req.token_ids[start:end])
            ids.extend([0] * (end - max(start, req.num_tokens)) if end > req.num_tokens else [])  # ahead
            pos.extend(range(start, end))
            slots.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            starts.append(starts[-1] + c.num_tokens)
            ctx.append(end)
        max_blocks = max(len(c.request.block_ids) for c in chunks)
        tables = [c.request.block_ids + [0] * (max_blocks - len(c.request.block_ids)) for c in chunks]
        num_decodes = 0
        while num_decodes < len(chunks) and chunks[num_decodes].num_tokens == 1:
            num_decodes += 1
        rows = [starts[i + 1] - 1 for i, c in enumerate(chunks) if c.samples]
        return StepInputs(ids, pos, slots, starts, ctx, tables, num_decodes, rows)

    def _device_inputs(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        width = max((len(t) for t in step.block_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=to_device(long_tensor(step.slots), dev),
            block_tables=to_device(padded_rows(step.block_tables, width), dev),
            seq_lens=to_device(long_tensor(step.context_lens), dev),
            query_start_loc=step.query_start_loc,
            query_start_loc_t=to_device(torch.tensor(step.query_start_loc, dtype=torch.int32), dev),
            context_lens=step.context_lens,
            num_decodes=step.num_decodes,
            block_size=self.layout.block_size,
        )
        return to_device(long_tensor(step.token_ids), dev), to_device(long_tensor(step.positions), dev), meta

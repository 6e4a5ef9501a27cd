"""The CUDA-graph decode path's inputs: static buffers, padding to a bucket, and the rows read back.

On CUDA the graphs are really captured and replayed; without CUDA the same DecodeGraphs runs its
forward eagerly at "replay" (Triton kernels under the interpreter), which checks everything but the
capture itself: a padded batch gives the same logits as the ordinary step and writes no K/V for its
padding rows.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

from pdserve.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from pdserve.engine.cuda_graphs import DecodeGraphs, DecodeInputs, batch_buckets  # noqa: E402
from pdserve.engine.model_runner import ModelRunner  # noqa: E402
from pdserve.engine.request import Request  # noqa: E402
from pdserve.engine.sampling import SamplingParams  # noqa: E402
from pdserve.engine.scheduler import ScheduledChunk  # noqa: E402
from pdserve.kernels.config import KernelConfig  # noqa: E402
from tests.kernels.triton_env import fix_interpreter  # noqa: E402

CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip


class _EagerReplay:
    """Stands in for a captured graph on CPU: 'replay' runs the forward on the static buffers."""

    def __init__(self, graphs: DecodeGraphs, batch: int) -> None:
        self.graphs, self.batch = graphs, batch

    def replay(self) -> None:
        self.graphs.logits[self.batch] = self.graphs._forward(self.batch)


@pytest.fixture(autouse=True)
def _interpreter_fixed() -> None:
    if not CUDA:
        fix_interpreter()


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(64)[-3:] == [48, 56, 64]


@pytest.fixture
def runner(tmp_path) -> ModelRunner:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    from transformers import AutoConfig

    device = "cuda" if CUDA else "cpu"
    model = ModelConfig(path=str(tmp_path), device=device, dtype="float32", load_format="dummy", seed=3)
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256)
    hf_config = AutoConfig.from_pretrained(str(tmp_path))
    kernels = KernelConfig(attention="triton")  # on CPU: the Triton backend under the interpreter
    return ModelRunner(model, CacheConfig(num_blocks=32), hf_config, sched, kernels=kernels)


def _prefilled(runner: ModelRunner, lengths: list[int]) -> list[Request]:
    reqs, next_block = [], 0
    for i, n in enumerate(lengths):
        r = Request(f"r{i}", [(7 * i + j) % 250 + 1 for j in range(n)], SamplingParams(max_tokens=4))
        blocks = -(-(n + 1) // 16)
        r.block_ids = list(range(next_block, next_block + blocks))
        next_block += blocks
        reqs.append(r)
    runner.execute([ScheduledChunk(r, len(r.token_ids)) for r in reqs])
    for r in reqs:
        r.num_computed_tokens = len(r.token_ids)
        r.token_ids.append(42)
    return reqs


def test_padded_bucket_equals_the_plain_step(runner: ModelRunner) -> None:
    reqs = _prefilled(runner, [5, 17, 40])  # 3 rows: replayed in the bucket of 4
    bs = runner.layout.block_size
    graphs = runner.graphs or DecodeGraphs(runner.model, runner.kv_caches, bs, 8, 8)
    if runner.graphs is None:  # CPU: no capture, an eager stand-in
        graphs.graphs = {b: _EagerReplay(graphs, b) for b in graphs.buckets}  # type: ignore[misc]
    chunks = [ScheduledChunk(r, 1) for r in reqs]
    ids, pos, meta = runner._device_inputs(runner._step_inputs(chunks))
    before = runner.kv_cache.clone()
    with torch.inference_mode():
        expected = runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))
        step = DecodeInputs(
            [42] * 3,
            [r.num_computed_tokens for r in reqs],
            [r.block_ids[p // bs] * bs + p % bs for r in reqs for p in [r.num_computed_tokens]],
            [r.num_computed_tokens + 1 for r in reqs],
            [r.block_ids for r in reqs],
        )
        got = graphs.run(step)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    tables = [r.block_ids + [0] * (3 - len(r.block_ids)) for r in reqs] + [[0, 0, 0]]  # bucket 4, width 3
    assert graphs.tables[:4, :3].tolist() == tables
    written = (runner.kv_cache != before).flatten(0, 1).flatten(3).any(-1).any(0)  # [blocks, block_size]
    slots = {r.block_ids[r.num_computed_tokens // bs] * bs + r.num_computed_tokens % bs for r in reqs}
    changed = {int(i) for i in written.flatten().nonzero().flatten()}
    assert changed <= slots  # the padding row wrote nothing


def test_warmup_steps_run_and_leave_nothing_to_compile(runner: ModelRunner) -> None:
    """The start-up steps are well formed (every row's logits come back), and on CUDA they leave no
    Triton kernel to compile for the steps real requests make afterwards, sampling included."""
    from pdserve.engine.warmup import warmup_steps
    from pdserve.kernels import sampling_triton
    from pdserve.kernels.attention import triton_cache, triton_decode, triton_prefill

    steps = warmup_steps(runner.layout.block_size, runner.num_blocks)
    assert [s.num_decodes for s in steps] == [0, 1]
    for step in steps:
        logits = runner.run_step(step)
        assert logits is not None and logits.shape == (len(step.logit_rows), CONFIG["vocab_size"])
        assert bool(torch.isfinite(logits).all())
    assert warmup_steps(16, 2) == []  # a pool too small for them: skipped
    if not CUDA:
        return
    kernels = [
        triton_prefill._prefill_kernel,
        triton_decode._decode_split_kernel,
        triton_decode._decode_reduce_kernel,
        triton_cache._store_kv_kernel,
        sampling_triton._sample_kernel,  # compiled by warm_sampler on the warm-up step's logits
        sampling_triton._pick_chunk_kernel,
    ]

    def compiled() -> list[int]:
        return [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels]  # (kernels, ...)

    before = compiled()
    reqs = _prefilled(runner, [3, 33, 70])  # several prompts, new lengths and block-table widths
    more = Request("late", list(range(1, 50)), SamplingParams(max_tokens=4))
    more.block_ids = list(range(20, 24))
    more.num_computed_tokens = 16  # a prompt continuing after a cached block, beside decodes
    runner.execute([ScheduledChunk(r, 1) for r in reqs] + [ScheduledChunk(more, 33)])
    assert compiled() == before

"""Tensor parallelism on disaggregated roles: a prefill and a decode instance at any TP each (the KV
crosses with every head, whatever the split) give token for token the colocated tp=1 output.

On the CPU the ranks are processes joined by Gloo and rank 0 maps the workers' pools from shared
memory. Two cuts: Qwen2 with 3 KV heads over 2 ranks (2 + 1) and Qwen3 with one KV head copied to both.
"""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.engine.kv_layout import allocate_kv_pool, block_major

from .test_tensor_parallel import GREEDY, prompts_for, save_shape


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny_model(request, tmp_path_factory) -> str:
    return save_shape(request.param, tmp_path_factory, "tp-pd")


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    return prompts_for(tiny_model, 6)


@pytest.fixture(scope="module")
def expected(tiny_model, prompts) -> list[list[int]]:
    llm = LLM(tiny_model, num_blocks=128, block_size=4)
    try:
        outs = [c.token_ids for c in llm.generate_ids(prompts, GREEDY)]
    finally:
        llm.close()
    assert len({tuple(o) for o in outs}) > 3  # the prompts do lead to different outputs
    return outs


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "transport"),
    [(2, 2, "inproc"), (1, 2, "inproc"), (2, 1, "inproc"), (2, 2, "tcp"), (1, 2, "nccl")],
)
def test_disaggregated_tp_equals_colocated_tp1(
    tiny_model, prompts, expected, prefill_tp, decode_tp, transport
):
    llm = LLM(
        tiny_model,
        num_blocks=128,
        block_size=4,
        prefill=1,
        decode=1,
        tensor_parallel_size=decode_tp,
        prefill_tensor_parallel_size=prefill_tp,
        kv_transport=transport,
    )
    try:
        got = [c.token_ids for c in llm.generate_ids(prompts, GREEDY)]
        assert got == expected
        assert llm.check_pool_free()
    finally:
        llm.close()


def test_cuda_ipc_alone_refuses_a_sharded_pool(tiny_model):
    with pytest.raises(ValueError, match="cuda_ipc cannot move a tensor-parallel KV pool"):
        LLM(tiny_model, num_blocks=64, prefill=1, decode=1, tensor_parallel_size=2, kv_transport="cuda_ipc")


def _pool(heads: int) -> torch.Tensor:
    """A pool [layers 2, k/v, 6 blocks, block_size 2, heads, dim 3] of distinct values."""
    return torch.arange(2 * 2 * 6 * 2 * heads * 3, dtype=torch.float32).view(2, 2, 6, 2, heads, 3)


def test_sharded_pool_gathers_every_head_once_and_writes_every_copy():
    """Payloads are block-major ([n, layers, 2, block_size, heads, dim], engine/kv_layout.py)."""
    full = _pool(3)
    wire = block_major(full)
    shards = ShardedPool([full[..., :2, :].clone(), full[..., 2:, :].clone()], [0, 2], 3)  # 2 + 1 heads
    assert shards.block_bytes == full[:, :, 0].numel() * 4
    torch.testing.assert_close(shards.gather([4, 1], torch.device("cpu")), wire[[4, 1]])
    payload = -wire[[2, 3]]
    shards.write([5, 0], payload)
    torch.testing.assert_close(block_major(shards.tensors[0])[[5, 0]], payload[..., :2, :])
    torch.testing.assert_close(block_major(shards.tensors[1])[[5, 0]], payload[..., 2:, :])
    assert torch.equal(shards.tensors[1][:, :, 1:5], full[:, :, 1:5, :, 2:])  # other blocks untouched

    one = _pool(1)  # one KV head, copied to both ranks
    copies = ShardedPool([one.clone(), one.clone()], [0, 0], 1)
    torch.testing.assert_close(copies.gather([2], torch.device("cpu")), block_major(one)[[2]])
    copies.write([3], torch.full((1, 2, 2, 2, 1, 3), 7.0))
    assert all(bool((t[:, :, 3] == 7.0).all()) for t in copies.tensors)

    with pytest.raises(ValueError, match="in no shard"):
        ShardedPool([_pool(1), _pool(1)], [0, 2], 3)


def test_pool_memory_is_block_major_and_payloads_are_contiguous_runs():
    """The engine's pool: a run of blocks (every layer, K and V) is one contiguous range of memory,
    which is what lets a transfer be one copy per run; the layer-major view computes as before."""
    pool = allocate_kv_pool(3, 8, 4, 2, 5, torch.float32, "cpu")
    assert pool.shape == (3, 2, 8, 4, 2, 5)
    assert block_major(pool)[2:5].is_contiguous()
    pool[1, 0, 6, 3, 1, 4] = 9.0
    assert block_major(pool)[6, 1, 0, 3, 1, 4] == 9.0
    flat = block_major(pool).reshape(-1)
    assert int((flat == 9.0).nonzero()) == ((6 * 3 + 1) * 2 + 0) * 4 * 2 * 5 + 3 * 2 * 5 + 1 * 5 + 4

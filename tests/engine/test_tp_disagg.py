"""Tensor parallelism on disaggregated roles: a prefill and a decode instance at any TP each (the KV
crosses with every head, whatever the split) give token for token the colocated tp=1 output.

On the CPU the ranks are processes joined by Gloo and rank 0 maps the workers' pools from shared
memory. Two cuts: Qwen2 with 3 KV heads over 2 ranks (2 + 1) and Qwen3 with one KV head copied to both.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pdserve import LLM
from pdserve.disagg.transport.shards import ShardedPool, copy_run, head_copies
from pdserve.kv_layout import allocate_kv_pool, block_major

from .test_tensor_parallel import GREEDY, prompts_for, save_shape, two_gpus


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


@two_gpus
@pytest.mark.parametrize(("prefill_tp", "decode_tp", "transport"), [(1, 2, "cuda_ipc"), (2, 1, "auto")])
def test_gpu_cuda_ipc_between_tp_instances_equals_colocated_tp1(
    tiny_model, prompts, prefill_tp, decode_tp, transport
):
    """The prefill writes every rank's heads straight into every decode rank's pool (its own workers'
    shards and the decode workers' are opened by CUDA IPC); auto picks that path for TP pools too."""
    torch.backends.cuda.matmul.allow_tf32 = False
    kw: dict[str, Any] = dict(device="cuda", dtype="float32", num_blocks=128, block_size=4)
    colocated = LLM(tiny_model, **kw)
    try:
        want = [c.token_ids for c in colocated.generate_ids(prompts, GREEDY)]
    finally:
        colocated.close()
    llm = LLM(
        tiny_model, **kw, prefill=1, decode=1, tensor_parallel_size=decode_tp,
        prefill_tensor_parallel_size=prefill_tp, kv_transport=transport,
    )  # fmt: skip
    try:
        assert [c.token_ids for c in llm.generate_ids(prompts, GREEDY)] == want
        connector = llm.prefill_engines[0].connector
        assert connector is not None and set(connector.transport.chosen.values()) == {"cuda_ipc"}
        assert llm.check_pool_free()
    finally:
        llm.close()


def _pool(heads: int) -> torch.Tensor:
    """A pool [layers 2, k/v, 6 blocks, block_size 2, heads, dim 3] of distinct values."""
    return torch.arange(2 * 2 * 6 * 2 * heads * 3, dtype=torch.float32).view(2, 2, 6, 2, heads, 3)


def test_sharded_pool_gathers_every_head_once_and_writes_every_copy():
    """Payloads are block-major ([n, layers, 2, block_size, heads, dim], pdserve/kv_layout.py)."""
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


def _split(full: torch.Tensor, starts: list[int], sizes: list[int]) -> ShardedPool:
    """Shards of a pool's heads (copies of `full`'s values)."""
    tensors = [full[..., s : s + n, :].clone() for s, n in zip(starts, sizes, strict=True)]
    return ShardedPool(tensors, starts, full.shape[4])


@pytest.mark.parametrize(
    ("heads", "src_cut", "dst_cut"),
    [
        (3, ([0], [3]), ([0, 2], [2, 1])),  # TP 1 -> 2 (3 KV heads: 2 + 1)
        (3, ([0, 2], [2, 1]), ([0], [3])),  # TP 2 -> 1
        (3, ([0, 1], [1, 2]), ([0, 2], [2, 1])),  # different cuts: strided head ranges on both sides
        (1, ([0, 0], [1, 1]), ([0, 0, 0], [1, 1, 1])),  # one head copied on every rank, both sides
        (3, ([0, 1], [2, 2]), ([0], [3])),  # overlapping source shards: head 2 read from mid-shard
    ],
)
def test_head_copies_move_blocks_between_any_two_cuts_of_the_heads(heads, src_cut, dst_cut):
    """What cuda_ipc does between tensor-parallel instances (transport/cuda_ipc.py), on CPU tensors:
    block runs copied shard to shard; every destination shard ends up with its heads of exactly the
    source blocks, at the destination block ids, and nothing else changes."""
    source = _pool(heads)
    src = _split(source, *src_cut)
    dst = _split(torch.zeros_like(source), *dst_cut)
    copies = head_copies(dst, src)
    for s, d, n in [(4, 0, 2), (1, 5, 1)]:  # blocks 4, 5 -> 0, 1 and 1 -> 5
        copy_run(copies, s, d, n)
    want = torch.zeros_like(block_major(source))
    want[[0, 1, 5]] = block_major(source)[[4, 5, 1]]
    for start, tensor in zip(dst.starts, dst.tensors, strict=True):
        torch.testing.assert_close(block_major(tensor), want[..., start : start + tensor.shape[4], :])
    with pytest.raises(ValueError, match="KV heads differ"):
        head_copies(ShardedPool.whole(_pool(heads + 1)), src)


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

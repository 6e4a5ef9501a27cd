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

from .test_tensor_parallel import GREEDY, SHAPES, SMALL
from .tiny_models import TEXTS, save_tiny_model


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny_model(request, tmp_path_factory) -> str:
    shape = {**SMALL, **SHAPES[request.param]}
    path = str(tmp_path_factory.mktemp(f"tp-pd-{request.param}"))
    return save_tiny_model(path, shape.pop("model_type"), **shape)


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok.encode(t)[: 4 + 5 * i] for i, t in enumerate(TEXTS[:6])]


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


def _pool(heads: int, fill: float | None = None) -> torch.Tensor:
    """[layers 2, k/v, 6 blocks, block_size 2, heads, dim 3]: distinct values, or `fill`."""
    if fill is not None:
        return torch.full((2, 2, 6, 2, heads, 3), fill)
    return torch.arange(2 * 2 * 6 * 2 * heads * 3, dtype=torch.float32).view(2, 2, 6, 2, heads, 3)


def test_sharded_pool_gathers_every_head_once_and_writes_every_copy():
    full = _pool(3)
    shards = ShardedPool([full[..., :2, :].clone(), full[..., 2:, :].clone()], [0, 2], 3)  # 2 + 1 heads
    assert shards.block_bytes == full[:, :, 0].numel() * 4
    torch.testing.assert_close(shards.gather([4, 1], torch.device("cpu")), full[:, :, [4, 1]])
    payload = -_pool(3)[:, :, :2]
    shards.write([5, 0], payload)
    torch.testing.assert_close(shards.tensors[0][:, :, [5, 0]], payload[..., :2, :])
    torch.testing.assert_close(shards.tensors[1][:, :, [5, 0]], payload[..., 2:, :])
    assert torch.equal(shards.tensors[1][:, :, 1:5], full[:, :, 1:5, :, 2:])  # other blocks untouched

    one = _pool(1)  # one KV head, copied to both ranks
    copies = ShardedPool([one.clone(), one.clone()], [0, 0], 1)
    torch.testing.assert_close(copies.gather([2], torch.device("cpu")), one[:, :, [2]])
    copies.write([3], torch.full((2, 2, 1, 2, 1, 3), 7.0))
    assert all(bool((t[:, :, 3] == 7.0).all()) for t in copies.tensors)

    with pytest.raises(ValueError, match="in no shard"):
        ShardedPool([_pool(1), _pool(1)], [0, 2], 3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 2), (1, 2)])
def test_gpu_disaggregated_tp_equals_colocated_tp1(tiny_model, prompts, prefill_tp, decode_tp):
    """float32 on cuda:0 (+ cuda:1): workers' pools opened by CUDA IPC on rank 0's GPU, KV by auto."""
    kwargs = dict(num_blocks=128, block_size=4, device="cuda", dtype="float32")
    colocated = LLM(tiny_model, **kwargs)
    try:
        expected = [c.token_ids for c in colocated.generate_ids(prompts, GREEDY)]
    finally:
        colocated.close()
    llm = LLM(
        tiny_model,
        prefill=1,
        decode=1,
        tensor_parallel_size=decode_tp,
        prefill_tensor_parallel_size=prefill_tp,
        kv_transport="auto",
        **kwargs,
    )
    try:
        assert [c.token_ids for c in llm.generate_ids(prompts, GREEDY)] == expected
        assert llm.check_pool_free()
    finally:
        llm.close()

"""The fused Triton MoE (kernels/triton_moe.py) against the torch reference (layers/moe.experts_torch):
the expert alignment's invariants, then the whole block for decode-sized and prefill-sized batches, with
experts no token picks, an intermediate size no tile divides, and top-k up to 4. Under the interpreter
on CPU with tiny shapes; the large shapes and bf16 on a GPU (`gpu`)."""

from __future__ import annotations

import pytest
import torch

from .triton_env import BF16, CUDA, DEVICE, HAS_TRITON, gpu, grid, interpreted_or_skip

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    from pdserve.kernels import triton_moe

    interpreted_or_skip(triton_moe._moe_gemm_kernel)


def routed(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives), skewed so that some experts get nothing."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen) * torch.linspace(1.0, 0.2, experts)
    weights, ids = torch.topk(torch.softmax(scores * 8, -1), top_k, dim=-1)
    return ids.to(DEVICE), weights.to(DEVICE)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (37, 6, 3, 16), (200, 16, 4, 64)])
def test_alignment_puts_every_assignment_once_in_its_experts_blocks(tokens, experts, top_k, block_m):
    from pdserve.kernels.triton_moe import align_by_expert

    ids, _ = routed(tokens, experts, top_k, seed=tokens)
    sorted_ids, block_expert = align_by_expert(ids, experts, block_m)
    m = tokens * top_k
    real = sorted_ids[sorted_ids < m].cpu()
    assert sorted(real.tolist()) == list(range(m))  # each (token, slot) exactly once
    flat = ids.reshape(-1).cpu()
    for b, e in enumerate(block_expert.cpu().tolist()):
        rows = sorted_ids[b * block_m : (b + 1) * block_m].cpu()
        rows = rows[rows < m]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows.long()] == e).all())
    used = int((torch.bincount(flat, minlength=experts) > 0).sum())
    assert int((block_expert >= 0).sum()) == sum(
        -(-int(c) // block_m) for c in torch.bincount(flat, minlength=experts) if c
    )
    assert used <= experts


def _weights(experts: int, hidden: int, inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(experts * hidden)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


SMALL = grid(
    [(1, 8, 2, 32, 48), (19, 4, 2, 32, 40), (70, 6, 4, 48, 24)],  # decode tiles, ragged I, prefill tiles
    [(1, 8, 2, 32, 48), (19, 4, 2, 32, 40), (70, 6, 4, 48, 24), (300, 16, 4, 256, 96)],
)
LARGE = [  # the qwen3-30b-a3b and ernie-4.5-21b-a3b expert shapes, one layer
    pytest.param(s, marks=gpu)
    for s in [(1, 128, 8, 2048, 768), (128, 128, 8, 2048, 768), (4096, 64, 6, 2560, 1536)]
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("shape", SMALL + LARGE, ids=str)
def test_fused_moe_equals_the_torch_reference(shape, dtype):
    from pdserve.kernels import triton_moe
    from pdserve.layers.moe import experts_torch

    tokens, experts, top_k, hidden, inter = shape
    ids, weights = routed(tokens, experts, top_k, seed=1)
    w13, w2 = _weights(experts, hidden, inter, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    weights = weights.to(dtype)
    tiles = None
    if not CUDA:  # interpreter: tiles as small as tl.dot takes, so a few programs cover each case
        big = tokens * top_k >= 32 * experts
        tiles = triton_moe.MoeTiles(block_m=16 if not big else 32, gate_up_n=16, down_n=16, block_k=16)
    got = triton_moe.fused_moe(x, w13, w2, ids, weights, tiles)
    ref = experts_torch(x, w13, w2, ids, weights)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)

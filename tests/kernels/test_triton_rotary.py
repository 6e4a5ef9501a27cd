"""The Triton rotary kernel against the torch rotate-half code, on q/k views cut from one qkv tensor.

On CUDA the cases run on the GPU; without CUDA the small ones run under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernel is defined); bf16 is GPU-only, as in test_triton_fused.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdserve.layers import triton_rotary
from pdserve.layers.rotary import RotaryEmbedding

from .triton_env import CUDA, DEVICE, DTYPES, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    if not CUDA and type(triton_rotary._rotary_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernel was defined before TRITON_INTERPRET=1 was set")


def _reference(rope: RotaryEmbedding, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple:
    cos, sin = rope.cos.cpu()[pos.cpu()].unsqueeze(1), rope.sin.cpu()[pos.cpu()].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu()
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return rot(q), rot(k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 2, 64), (7, 40, 8, 128), (5, 14, 2, 64)])
def test_matches_torch(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    cfg = SimpleNamespace(rope_theta=1_000_000.0)
    rope = RotaryEmbedding(cfg, head_dim, 4096).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    v_before = v.clone()
    pos = torch.randint(0, 4096, (tokens,), device=DEVICE)
    want_q, want_k = _reference(rope, pos, q, k)
    got_q, got_k = triton_rotary.triton_rotary(pos, q, k, rope.cos, rope.sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert not got.isnan().any()
        torch.testing.assert_close(got.float().cpu(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    assert torch.equal(v, v_before)  # the neighbour in qkv is untouched


@pytest.mark.skipif(not CUDA, reason="the dispatch picks the kernel for CUDA tensors only")
def test_module_dispatch_on_cuda() -> None:
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 64, 128).to(DEVICE)
    q, k = torch.randn(3, 4, 64, device=DEVICE), torch.randn(3, 2, 64, device=DEVICE)
    pos = torch.tensor([0, 5, 127], device=DEVICE)
    want_q, want_k = _reference(rope, pos, q, k)
    got_q, got_k = rope(pos, q, k)
    torch.testing.assert_close(got_q.cpu(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.cpu(), want_k, atol=1e-5, rtol=1e-5)

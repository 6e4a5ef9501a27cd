"""The Triton rotary kernel against the torch rotate-half code, on q/k views cut from one qkv tensor.

On CUDA the cases run on the GPU; without CUDA fewer small ones run under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernel is defined); bf16 is GPU-only, as in test_triton_fused.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdserve.kernels import norm, triton_rotary
from pdserve.layers.rotary import RotaryEmbedding

from .triton_env import DEVICE, DTYPES, HAS_TRITON, build, grid, interpreted_or_skip

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
KERNELS = build()  # what the default config chooses here: Triton on CUDA, torch on CPU
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    interpreted_or_skip(triton_rotary._rotary_kernel)


def _reference(rope: RotaryEmbedding, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple:
    cos, sin = rope.cos.cpu()[pos.cpu()].unsqueeze(1), rope.sin.cpu()[pos.cpu()].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu()
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return rot(q), rot(k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim", grid([(5, 14, 2, 64)], [(1, 4, 2, 64), (7, 40, 8, 128), (5, 14, 2, 64)])
)
def test_matches_torch(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    cfg = SimpleNamespace(rope_theta=1_000_000.0)
    rope = RotaryEmbedding(cfg, head_dim, 4096, KERNELS).to(DEVICE)
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


def test_module_gives_the_reference_with_the_chosen_kernels() -> None:
    """RotaryEmbedding with the default config's kernels: the Triton launch on CUDA, torch on CPU."""
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 64, 128, KERNELS).to(DEVICE)
    q, k = torch.randn(3, 4, 64, device=DEVICE), torch.randn(3, 2, 64, device=DEVICE)
    pos = torch.tensor([0, 5, 127], device=DEVICE)
    want_q, want_k = _reference(rope, pos, q, k)
    got_q, got_k = rope(pos, q, k)
    torch.testing.assert_close(got_q.cpu(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.cpu(), want_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim", grid([(6, 14, 2, 64)], [(1, 4, 2, 64), (6, 14, 2, 64), (5, 40, 8, 128)])
)
def test_rotary_store_writes_rotated_k_and_v_into_the_cache(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    """The fused launch against rotate-then-store: q rotated in place, the cache (a layer of the real
    pool layout, strided) holds rotated k and plain v at each slot, padded tokens (slot -1) write
    nothing, and k's own memory is left alone."""
    from pdserve.kv_layout import allocate_kv_pool

    torch.manual_seed(tokens * 100 + heads)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=1_000_000.0), head_dim, 4096, KERNELS).to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    v = v.view(tokens, kv_heads, head_dim)
    pool = allocate_kv_pool(2, 6, 4, kv_heads, head_dim, dtype, DEVICE)
    pool.normal_()
    before = pool.clone()
    slots = torch.randperm(24)[:tokens].to(DEVICE)
    slots[-1] = -1  # the last token is padding
    pos = torch.randint(0, 4096, (tokens,), device=DEVICE)
    want_q, want_k = _reference(rope, pos, q, k)
    k_before, v_before = k.clone(), v.clone()
    triton_rotary.rotary_store_kv(pos, q, k, v, rope.cos, rope.sin, pool[1], slots)
    tol = dict(atol=TOL[dtype] * 4, rtol=TOL[dtype])
    torch.testing.assert_close(q.float().cpu(), want_q, **tol)
    assert torch.equal(k, k_before) and torch.equal(v, v_before) and torch.equal(pool[0], before[0])
    written = slots[:-1].cpu()
    got = pool[1].flatten(1, 2).cpu()  # [2, blocks * block_size, heads, dim]
    torch.testing.assert_close(got[0, written].float(), want_k[:-1], **tol)
    assert torch.equal(got[1, written], v_before[:-1].cpu())
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(got[:, untouched], before[1].flatten(1, 2).cpu()[:, untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim", grid([(1, 4, 2, 64)], [(1, 4, 2, 64), (5, 64, 8, 128)])
)
def test_rotary_store_with_qk_norm_matches_norm_then_rotate(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Qwen3's per-head q/k RMSNorm inside the same launch: q and the cache's k equal RMSNorm (the
    torch code, rounding where it rounds) then rotary, each with its own weight; v is copied as is.
    Without the norms the same inputs give a different q (the norm is really applied)."""
    from pdserve.kv_layout import allocate_kv_pool

    torch.manual_seed(tokens + heads)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=1_000_000.0), head_dim, 4096, KERNELS).to(DEVICE)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) * 3).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    v = v.view(tokens, kv_heads, head_dim)
    qw, kw = (torch.rand(head_dim) + 0.5).to(DEVICE, dtype), (torch.rand(head_dim) + 0.5).to(DEVICE, dtype)
    pool = allocate_kv_pool(1, 4, 4, kv_heads, head_dim, dtype, DEVICE)
    slots = torch.randperm(16)[:tokens].to(DEVICE)
    pos = torch.randint(0, 4096, (tokens,), device=DEVICE)
    normed_q, normed_k = (norm.rms_norm(x.cpu(), w.cpu(), 1e-6) for x, w in ((q, qw), (k, kw)))
    want_q, want_k = _reference(rope, pos, normed_q.to(DEVICE), normed_k.to(DEVICE))
    plain_q = q.clone()
    triton_rotary.rotary_store_kv(pos, plain_q, k, v, rope.cos, rope.sin, pool[0], slots.clone())
    triton_rotary.rotary_store_kv(pos, q, k, v, rope.cos, rope.sin, pool[0], slots, (qw, kw, 1e-6))
    tol = dict(atol=TOL[dtype] * 4, rtol=TOL[dtype])
    torch.testing.assert_close(q.float().cpu(), want_q, **tol)
    got = pool[0].flatten(1, 2).cpu()  # [2, blocks * block_size, heads, dim]
    torch.testing.assert_close(got[0, slots.cpu()].float(), want_k, **tol)
    assert torch.equal(got[1, slots.cpu()], v.cpu())
    assert not torch.allclose(plain_q.float().cpu(), want_q, **tol)

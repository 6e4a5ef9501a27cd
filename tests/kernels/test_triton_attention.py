"""The Triton attention backend against the torch reference, on fresh random paged batches.

On CUDA every case runs on the GPU (the large ones are marked gpu). Without CUDA, fewer small cases run
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
defined); bf16 is GPU-only there, since triton 3.6's interpreter multiplies bf16 bit patterns as
integers in tl.dot. Everything that needs triton is skipped when it is not installed. The backend
gets its launches as the engine does: from build_kernels with attention=triton.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

from pdserve.kernels.ops import AttentionKernels
from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.layers.attention.torch_backend import TorchAttentionBackend
from pdserve.layers.attention.triton_backend import TritonAttentionBackend

from .triton_env import (
    CUDA,
    DEVICE,
    HAS_TRITON,
    build,
    gpu,
    grid,
    hopper_tuning,
    interpreted_or_skip,
)

if HAS_TRITON:
    from pdserve.kernels.attention import triton_decode

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
ONE_ROUNDING = {torch.float32: 2.4e-7, torch.float16: 9.8e-4}  # relative: one unit in the last place
KERNELS = build()  # the default config's choice here: the rotary and norms Triton on CUDA, torch on CPU
TILES = hopper_tuning().attention


def triton_backend(
    heads: int, kv_heads: int, dim: int, scale: float, **options: bool
) -> TritonAttentionBackend:
    """The Triton backend with the launches build_kernels binds for attention=triton (and `options`)."""
    ops = build(attention="triton", **options).attention
    assert ops is not None
    return TritonAttentionBackend(heads, kv_heads, dim, scale, ops)


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    if HAS_TRITON:
        interpreted_or_skip(triton_decode._decode_split_kernel)


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, H_kv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, H_kv, D]
    meta: AttentionMetadata


def make_batch(
    seqs: list[tuple[int, int]],  # (context length after this step, new tokens), decodes (n=1) first
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
) -> Batch:
    """Random q/k/v and a random cache; each sequence's blocks are a random, scattered set."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(need) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, slots, starts = [], [], [0]
    for (ctx, n), nb in zip(seqs, need, strict=True):
        blocks, pool = pool[:nb], pool[nb:]
        tables.append(blocks + [0] * (max(need) - nb))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(ctx - n, ctx))
        starts.append(starts[-1] + n)
    num_tokens = starts[-1]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)

    ctx_lens = [ctx for ctx, _ in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.long, device=DEVICE),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.long, device=DEVICE),
        query_start_loc=starts,
        context_lens=ctx_lens,
        num_decodes=next((i for i, (_, n) in enumerate(seqs) if n != 1), len(seqs)),
        block_size=block_size,
    )
    qkv = randn(num_tokens, heads + 2 * kv_heads, head_dim)  # k and v as strided views, like the model's
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    return Batch(q.contiguous(), k, v, randn(2, num_blocks, block_size, kv_heads, head_dim), meta)


def reference(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend on fp32 copies: (output, cache after the write)."""
    cache = batch.kv_cache.float()
    heads, kv_heads, dim = batch.q.shape[1], batch.k.shape[1], batch.q.shape[2]
    backend = TorchAttentionBackend(heads, kv_heads, dim, dim**-0.5)
    out = backend.forward(batch.q.float(), batch.k.float(), batch.v.float(), cache, batch.meta)
    return out, cache


def run_triton(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    cache = batch.kv_cache.clone()
    heads, kv_heads, dim = batch.q.shape[1], batch.k.shape[1], batch.q.shape[2]
    backend = triton_backend(heads, kv_heads, dim, dim**-0.5)
    return backend.forward(batch.q, batch.k, batch.v, cache, batch.meta), cache


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "NaN in the output"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def check(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, bs: int, dtype: torch.dtype
) -> None:
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("the triton 3.6 interpreter's tl.dot is wrong for bf16")
    batch = make_batch(
        seqs, heads, kv_heads, dim, bs, dtype, seed=hash((tuple(seqs), heads, dim, bs)) % 2**31
    )
    ref_out, ref_cache = reference(batch)
    out, cache = run_triton(batch)
    assert torch.equal(cache.float(), ref_cache), "the cache write differs"
    assert_close(out, ref_out, dtype)


def random_seqs(rng: random.Random, decodes: int, prefills: int, max_ctx: int) -> list[tuple[int, int]]:
    seqs = [(rng.randint(1, max_ctx), 1) for _ in range(decodes)]
    for i in range(prefills):
        ctx = rng.randint(2, max_ctx)
        seqs.append((ctx, ctx if i % 3 == 0 else rng.randint(2, ctx)))  # every third has no cached prefix
    return seqs


# ---- small cases: on the GPU, or on CPU under the interpreter ----------------------------------------

SMALL = [
    # (seqs, heads, kv_heads, head_dim, block_size)
    ([(1, 1), (17, 1), (40, 1)], 4, 4, 64, 16),  # decodes only, MHA
    ([(33, 33)], 8, 2, 64, 16),  # one prompt, no prefix
    ([(70, 20)], 4, 1, 64, 16),  # a chunk over a cached prefix, all heads on one kv head
    ([(5, 1), (29, 1), (50, 50), (61, 13)], 7, 1, 64, 16),  # mixed decodes and prefills, GQA 7
    ([(90, 1), (3, 1), (100, 35)], 8, 2, 128, 32),  # head_dim 128, block 32
    ([(130, 1), (64, 64), (129, 2)], 4, 2, 64, 64),  # block 64, a two-token chunk
    ([(20, 1), (45, 12)], 4, 2, 64, 8),  # a block smaller than a tile
]
SMALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL, ids=[f"small{i}" for i in range(len(SMALL))])
def test_small(case: tuple, dtype: torch.dtype) -> None:
    """Every layout case in fp32 on CPU (fp16's rounding is covered by the random cases there)."""
    if dtype != torch.float32 and not CUDA:
        pytest.skip("fp32 only under the interpreter: fp16 runs in test_random_small")
    check(*case, dtype)


RANDOM_SMALL = [
    # (decodes, prefills, max_ctx, heads, kv_heads, head_dim, block_size)
    (6, 2, 150, 8, 1, 64, 16),
    (3, 3, 300, 4, 4, 64, 16),
    (0, 4, 150, 7, 1, 128, 16),
    (9, 1, 260, 8, 2, 64, 32),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", RANDOM_SMALL, ids=[f"random{i}" for i in range(len(RANDOM_SMALL))])
def test_random_small(case: tuple, dtype: torch.dtype) -> None:
    if not CUDA and (dtype == torch.float32) != (RANDOM_SMALL.index(case) % 2 == 0):
        pytest.skip("under the interpreter each random case runs in one dtype (even: fp32, odd: fp16)")
    decodes, prefills, max_ctx, heads, kv_heads, dim, bs = case
    seqs = random_seqs(random.Random(hash(case)), decodes, prefills, max_ctx)
    check(seqs, heads, kv_heads, dim, bs, dtype)


@needs_triton
@pytest.mark.parametrize(
    "splits,config",
    grid(
        [(1, None), (16, None), (4, (128, 4, 2))],
        [(1, None), (2, None), (4, None), (16, None), (4, (128, 4, 2)), (1, (64, 2, 3))],
    ),
)
def test_decode_splits_and_tiles_agree(splits: int, config: tuple[int, int, int] | None) -> None:
    """Any number of partitions, empty ones included, and any tile of the kernel-tuning sweep
    (benchmarks/kernel_bench.py --sweep-decode), gives the same output."""
    batch = make_batch([(200, 1), (7, 1), (65, 1)], 8, 2, 64, 16, torch.float32, seed=splits)
    ref_out, _ = reference(batch)
    cache = batch.kv_cache.clone()
    TorchAttentionBackend(8, 2, 64, 0.125).forward(batch.q, batch.k, batch.v, cache, batch.meta)  # writes K/V
    out = torch.full_like(batch.q, float("nan"))
    triton_decode.paged_decode(
        batch.q, cache, batch.meta.block_tables, batch.meta.seq_lens, out, 0.125, splits, TILES, config
    )
    assert_close(out, ref_out, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rotary_fused_with_the_cache_write_matches_rotate_then_attend(dtype: torch.dtype) -> None:
    """forward_rotary (the model's call): the Triton backend rotates k on its way into the cache; the
    torch backend rotates first, then writes and attends. Same cache, same output, on decodes and
    prefills (with and without a cached prefix)."""
    from types import SimpleNamespace

    from pdserve.layers.rotary import RotaryEmbedding

    seqs = [(5, 1), (29, 1), (50, 50), (61, 13)]
    batch = make_batch(seqs, 7, 1, 64, 16, dtype, seed=11)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 64, 256, KERNELS).to(DEVICE)
    positions = torch.tensor([p for ctx, n in seqs for p in range(ctx - n, ctx)], device=DEVICE)
    ref_cache = batch.kv_cache.float().clone()  # copies: on CUDA the torch path rotates q, k in place
    q, k, v = (x.float().clone() for x in (batch.q, batch.k, batch.v))
    ref_out = TorchAttentionBackend(7, 1, 64, 0.125).forward_rotary(
        rope, positions, q, k, v, ref_cache, batch.meta
    )
    cache = batch.kv_cache.clone()
    out = triton_backend(7, 1, 64, 0.125).forward_rotary(
        rope, positions, batch.q.clone(), batch.k, batch.v, cache, batch.meta
    )
    torch.testing.assert_close(cache.float(), ref_cache, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert_close(out, ref_out, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_qk_norm_fused_into_the_rotary_cache_write_matches_norm_then_rotate(dtype: torch.dtype) -> None:
    """forward_rotary with Qwen3's per-head q/k RMSNorms: the Triton backend applies them inside its
    rotary + cache-write launch, the torch backend calls the RMSNorm modules first. Same cache, same
    output, on decodes and prefills."""
    from types import SimpleNamespace

    from pdserve.layers.norm import RMSNorm
    from pdserve.layers.rotary import RotaryEmbedding

    seqs = [(5, 1), (29, 1), (50, 50), (61, 13)]
    batch = make_batch(seqs, 7, 1, 64, 16, dtype, seed=12)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 64, 256, KERNELS).to(DEVICE)
    positions = torch.tensor([p for ctx, n in seqs for p in range(ctx - n, ctx)], device=DEVICE)
    norms = (RMSNorm(64, 1e-6, KERNELS).to(DEVICE, dtype), RMSNorm(64, 1e-6, KERNELS).to(DEVICE, dtype))
    ref_norms = (RMSNorm(64, 1e-6, KERNELS).to(DEVICE), RMSNorm(64, 1e-6, KERNELS).to(DEVICE))
    for norm, ref in zip(norms, ref_norms, strict=True):
        norm.weight.requires_grad_(False).uniform_(0.5, 1.5)
        ref.weight.requires_grad_(False).copy_(norm.weight.float())
    ref_cache = batch.kv_cache.float().clone()
    q, k, v = (x.float().clone() for x in (batch.q, batch.k, batch.v))
    ref_out = TorchAttentionBackend(7, 1, 64, 0.125).forward_rotary(
        rope, positions, q, k, v, ref_cache, batch.meta, ref_norms
    )
    cache = batch.kv_cache.clone()
    out = triton_backend(7, 1, 64, 0.125).forward_rotary(
        rope, positions, batch.q.clone(), batch.k, batch.v, cache, batch.meta, norms
    )
    torch.testing.assert_close(cache.float(), ref_cache, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert_close(out, ref_out, dtype)


def _rope_and_norms(dim: int, dtype: torch.dtype, norm: bool):  # type: ignore[no-untyped-def]
    """A rotary table and, with `norm`, Qwen3-like q/k RMSNorms (weights away from 1)."""
    from types import SimpleNamespace

    from pdserve.layers.norm import RMSNorm
    from pdserve.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), dim, 256, KERNELS).to(DEVICE)
    if not norm:
        return rope, None
    norms = (RMSNorm(dim, 1e-6, KERNELS).to(DEVICE, dtype), RMSNorm(dim, 1e-6, KERNELS).to(DEVICE, dtype))
    for n in norms:
        n.weight.requires_grad_(False).uniform_(0.5, 1.5)
    return rope, norms


@needs_triton
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("splits", grid([4], [1, 2, 4]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_kernel_rotates_stores_and_attends_the_new_token(
    norm: bool, splits: int, dtype: torch.dtype
) -> None:
    """triton_new_token: the decode kernel given the new token's unrotated q/k/v gives the cache and the
    output of the rotary + cache-write launch followed by decode, and leaves q as it was; sequences of
    one token, at block edges and split over partitions."""
    from pdserve.kernels.attention.new_token import NewToken
    from pdserve.kernels.triton_rotary import rotary_store_kv

    seqs = [(1, 1), (5, 1), (16, 1), (17, 1), (70, 1), (129, 1)]
    batch = make_batch(seqs, 14, 2, 64, 16, dtype, seed=21 + splits)
    rope, modules = _rope_and_norms(64, dtype, norm)
    norms = None if modules is None else (modules[0].weight, modules[1].weight, modules[0].eps)
    positions = torch.tensor([ctx - 1 for ctx, _ in seqs], device=DEVICE)
    meta = batch.meta
    ref_q, ref_cache, ref_out = batch.q.clone(), batch.kv_cache.clone(), torch.empty_like(batch.q)
    slots = meta.slot_mapping
    rotary_store_kv(positions, ref_q, batch.k, batch.v, rope.cos, rope.sin, ref_cache, slots, norms)
    triton_decode.paged_decode(
        ref_q, ref_cache, meta.block_tables, meta.seq_lens, ref_out, 0.125, splits, TILES
    )
    q, cache, out = batch.q.clone(), batch.kv_cache.clone(), torch.empty_like(batch.q)
    new = NewToken(batch.k, batch.v, positions, rope.cos, rope.sin, meta.slot_mapping, norms)
    triton_decode.paged_decode(
        q, cache, meta.block_tables, meta.seq_lens, out, 0.125, splits, TILES, new_token=new
    )
    assert torch.equal(q, batch.q), "q is rotated inside the kernel, not in place"
    if CUDA or norm:  # the GPU compiler may contract products differently; the norm's sum of squares
        # is reduced over the whole head here, over its two halves there: one rounding apart
        torch.testing.assert_close(cache, ref_cache, atol=1e-6, rtol=ONE_ROUNDING[dtype])
    else:
        assert torch.equal(cache, ref_cache), "K/V written otherwise than triton_rotary writes them"
    assert_close(out, ref_out.float(), dtype)


@needs_triton
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
def test_backend_takes_the_fused_decode_for_decode_only_steps(norm: bool) -> None:
    """triton_new_token (the default): forward_rotary on a decode-only step (with CUDA-graph padding rows:
    length 0, slot -1) skips the rotary launch and gives what the two-launch path gives
    (decode_rotary=off); a step with a prefill keeps the rotary launch."""
    rope, norms = _rope_and_norms(64, torch.float32, norm)
    batch = make_batch([(37, 1), (12, 1), (1, 1)], 8, 2, 64, 16, torch.float32, seed=8)
    meta = batch.meta
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.full((1,), -1, device=DEVICE)])
    meta.block_tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:1])])
    meta.seq_lens = torch.cat([meta.seq_lens, torch.zeros(1, dtype=torch.long, device=DEVICE)])
    meta.query_start_loc, meta.context_lens, meta.num_decodes = [0, 1, 2, 3, 4], [*meta.context_lens, 0], 4
    q, k, v = (torch.cat([x, torch.randn_like(x[:1])]) for x in (batch.q, batch.k, batch.v))
    positions = torch.tensor([36, 11, 0, 0], device=DEVICE)
    two_launches = triton_backend(8, 2, 64, 0.125, decode_rotary=False)
    ref_cache = batch.kv_cache.clone()
    ref = two_launches.forward_rotary(rope, positions, q.clone(), k, v, ref_cache, meta, norms)
    calls: list[int] = []
    backend = _counting_rotary_launches(triton_backend(8, 2, 64, 0.125), calls)
    cache = batch.kv_cache.clone()
    out = backend.forward_rotary(rope, positions, q.clone(), k, v, cache, meta, norms)
    assert not calls, "a decode-only step must not launch the rotary kernel"
    torch.testing.assert_close(cache, ref_cache, atol=1e-6, rtol=ONE_ROUNDING[torch.float32])
    assert_close(out, ref.float(), torch.float32)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    mixed = make_batch([(20, 1), (9, 9)], 8, 2, 64, 16, torch.float32, seed=9)
    positions = torch.tensor([19, *range(9)], device=DEVICE)
    backend.forward_rotary(rope, positions, mixed.q, mixed.k, mixed.v, mixed.kv_cache, mixed.meta, norms)
    assert calls == [1]


def _counting_rotary_launches(backend: TritonAttentionBackend, calls: list[int]) -> TritonAttentionBackend:
    ops: AttentionKernels = backend.ops
    real = ops.rotary_store_kv
    backend.ops = replace(ops, rotary_store_kv=lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return backend


@needs_triton
def test_padded_decode_batch_writes_zeros_and_nothing_else() -> None:
    """CUDA-graph padding: seq_len 0 gives a zero row; slot -1 writes nothing."""
    batch = make_batch([(37, 1), (12, 1)], 4, 2, 64, 16, torch.float32, seed=7)
    ref_out, ref_cache = reference(batch)
    meta = batch.meta
    pad = 2
    padded = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((pad,), -1, device=DEVICE)]),
        block_tables=torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:pad])]),
        seq_lens=torch.cat([meta.seq_lens, torch.zeros(pad, dtype=torch.long, device=DEVICE)]),
        query_start_loc=[0, 1, 2, 3, 4],
        context_lens=[*meta.context_lens, 0, 0],
        num_decodes=4,
        block_size=16,
    )

    def extend(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.randn_like(x[:pad])])

    cache = batch.kv_cache.clone()
    out = triton_backend(4, 2, 64, 0.125).forward(
        extend(batch.q), extend(batch.k), extend(batch.v), cache, padded
    )
    assert torch.equal(cache, ref_cache)
    assert_close(out[:2], ref_out, torch.float32)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


# ---- large cases: GPU only -----------------------------------------------------------------------

LARGE = [
    # (decodes, prefills, max_ctx, heads, kv_heads, head_dim, block_size)
    (1, 0, 4000, 28, 4, 128, 16),  # batch 1, long context: many splits
    (64, 0, 4000, 32, 8, 128, 16),
    (32, 0, 1500, 8, 8, 64, 16),  # MHA
    (16, 3, 3000, 28, 4, 128, 16),  # mixed, GQA 7
    (0, 5, 4000, 40, 8, 128, 16),  # prefills over prefixes, GQA 5
    (8, 4, 2500, 32, 4, 64, 32),  # GQA 8, block 32
    (24, 2, 4000, 16, 2, 128, 128),  # block 128
    (5, 5, 1000, 14, 2, 64, 64),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=gpu) for c in LARGE], ids=[f"large{i}" for i in range(len(LARGE))]
)
def test_large(case: tuple, dtype: torch.dtype) -> None:
    decodes, prefills, max_ctx, heads, kv_heads, dim, bs = case
    seqs = random_seqs(random.Random(hash(case)), decodes, prefills, max_ctx)
    check(seqs, heads, kv_heads, dim, bs, dtype)

"""--kv-cache-dtype fp8: the attention backends write K/V into an e4m3 pool and widen it where they
read it. The Triton backend (under the interpreter on CPU) against the torch one, both over an fp8 pool:
the same bytes written, the same outputs (on CPU for K/V that e4m3 holds exactly: the interpreter
rounds some values wrongly); and the torch backend over an fp8 pool equals it over a
float32 pool holding the same (e4m3-rounded) values.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.layers.attention.torch_backend import TorchAttentionBackend

from .test_triton_attention import make_batch, triton_backend
from .triton_env import CUDA, HAS_TRITON, fix_interpreter

E4M3 = torch.float8_e4m3fn
SEQS = [(37, 1), (5, 1), (29, 29), (40, 7)]  # two decodes, a whole prompt, a chunk after a cached prefix


def _torch(heads: int, kv_heads: int, dim: int) -> TorchAttentionBackend:
    return TorchAttentionBackend(heads, kv_heads, dim, dim**-0.5)


def test_torch_backend_reads_an_fp8_pool_as_its_rounded_values() -> None:
    b = make_batch(SEQS, 4, 2, 32, 16, torch.float32, seed=3)
    pool = b.kv_cache.to(E4M3)
    out = _torch(4, 2, 32).forward(b.q, b.k, b.v, pool, b.meta)
    # the same values in a float32 pool, and this step's K/V rounded as the fp8 pool stores them
    wide = pool.float()
    k, v = b.k.to(E4M3).float(), b.v.to(E4M3).float()
    want = _torch(4, 2, 32).forward(b.q, k, v, wide, b.meta)
    assert pool.dtype == E4M3 and torch.equal(pool.float(), wide)  # written as e4m3 of the same values
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert (out - _torch(4, 2, 32).forward(b.q, b.k, b.v, b.kv_cache.clone(), b.meta)).abs().max() > 1e-3


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_over_an_fp8_pool_equals_the_torch_backend() -> None:
    if not CUDA:
        fix_interpreter()
    b = make_batch(SEQS, 4, 2, 32, 16, torch.float32, seed=5)
    if not CUDA:  # triton 3.6's interpreter drops the carry where rounding to e4m3 reaches the next
        # power of two (1.97 -> 1.0, not 2.0); values e4m3 holds exactly convert right there
        b.k, b.v = b.k.to(E4M3).float(), b.v.to(E4M3).float()
    ref_pool, tri_pool = b.kv_cache.to(E4M3), b.kv_cache.to(E4M3)
    want = _torch(4, 2, 32).forward(b.q, b.k, b.v, ref_pool, b.meta)
    got = triton_backend(4, 2, 32, 32**-0.5).forward(b.q, b.k, b.v, tri_pool, b.meta)
    assert torch.equal(tri_pool.view(torch.uint8), ref_pool.view(torch.uint8))  # the same bytes written
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)

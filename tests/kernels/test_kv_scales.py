"""Per-layer scales of an fp8 KV pool (engine/kv_scales.py): the pool holds K / k_scale and V / v_scale,
attention multiplies them back.

A batch whose K reaches +-1000 (Qwen2's biased K projections reach hundreds) and whose V is small:
over an e4m3 pool of scale 1, K saturates at 448 and V sinks into subnormals, and the output is far
from the float32 one; with the scales calibration gives (scale_for of the maxima) it is close. The
Triton backend (under the interpreter on CPU) writes the same bytes and gives the same output as the
torch one through each of its three cache writes: the store kernel, rotary + store, and the decode
kernel's own new token (rotary at position 0 is the identity, so the interpreter's e4m3 rounding
slip, see test_kv_fp8.py, is kept out by values e4m3 holds exactly after scaling).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdserve.engine.kv_scales import scale_for
from pdserve.layers.attention.backend import AttentionBackend
from pdserve.layers.attention.torch_backend import TorchAttentionBackend
from pdserve.layers.rotary import RotaryEmbedding

from .test_triton_attention import KERNELS, Batch, make_batch, triton_backend
from .triton_env import CUDA, DEVICE, HAS_TRITON, fix_interpreter

E4M3 = torch.float8_e4m3fn
SEQS = [(37, 1), (5, 1), (29, 29), (40, 7)]  # two decodes, a whole prompt, a chunk after a cached prefix
K_SIZE, V_SIZE = 300.0, 0.004  # K up to ~+-1000, V mostly below e4m3's smallest normal (2^-6)


def _batch(seqs: list[tuple[int, int]], seed: int) -> tuple[Batch, float, float]:
    """A float32 batch (cache included) with large K and small V, and the scales calibration gives it."""
    b = make_batch(seqs, 4, 2, 32, 16, torch.float32, seed=seed)
    b.q, b.k, b.v = b.q * (2.0 / K_SIZE), b.k * K_SIZE, b.v * V_SIZE  # scores of order 1: a soft softmax
    b.kv_cache[0] *= K_SIZE
    b.kv_cache[1] *= V_SIZE
    k_amax = max(b.k.abs().max().item(), b.kv_cache[0].abs().max().item())
    v_amax = max(b.v.abs().max().item(), b.kv_cache[1].abs().max().item())
    return b, scale_for(k_amax), scale_for(v_amax)


def _fp8_pool(cache: torch.Tensor, k_scale: float, v_scale: float) -> torch.Tensor:
    """The float32 cache as an fp8 pool of these scales holds it."""
    return torch.stack([(cache[0] / k_scale).to(E4M3), (cache[1] / v_scale).to(E4M3)])


def _scaled(backend: AttentionBackend, k_scale: float, v_scale: float) -> AttentionBackend:
    backend.set_kv_scales(k_scale, v_scale)
    return backend


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def test_calibrated_scales_keep_large_keys_that_scale_one_saturates() -> None:
    b, k_scale, v_scale = _batch(SEQS, seed=7)
    assert k_scale >= 2.0 and v_scale <= 2.0**-6  # the test's premise: K past 448, V in the subnormals
    ref = TorchAttentionBackend(4, 2, 32, 32**-0.5).forward(b.q, b.k, b.v, b.kv_cache.clone(), b.meta)

    unit_pool = _fp8_pool(b.kv_cache, 1.0, 1.0)
    unit = TorchAttentionBackend(4, 2, 32, 32**-0.5).forward(b.q, b.k, b.v, unit_pool, b.meta)
    assert unit_pool[0].float().abs().max() == 448.0  # saturated

    pool = _fp8_pool(b.kv_cache, k_scale, v_scale)
    backend = _scaled(TorchAttentionBackend(4, 2, 32, 32**-0.5), k_scale, v_scale)
    out = backend.forward(b.q, b.k, b.v, pool, b.meta)
    written = b.meta.slot_mapping
    stored_k = pool[0].flatten(0, 1)[written].float()  # this step's K as the pool holds it
    torch.testing.assert_close(stored_k, (b.k / k_scale).to(E4M3).float())
    # e4m3's own rounding (3 mantissa bits) leaves ~4% here; saturation and subnormals ~25%
    assert _relative_error(unit, ref) > 0.15
    assert _relative_error(out, ref) < 0.06


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("path", ["store", "rotary_store", "new_token"])
def test_triton_backend_with_scales_equals_the_torch_backend(path: str) -> None:
    if not CUDA:
        fix_interpreter()
    seqs = [(37, 1), (5, 1), (17, 1)] if path == "new_token" else SEQS
    b, k_scale, v_scale = _batch(seqs, seed=11)
    if not CUDA:  # values that e4m3 holds exactly once scaled (the interpreter's rounding slip)
        b.k = (b.k / k_scale).to(E4M3).float() * k_scale
        b.v = (b.v / v_scale).to(E4M3).float() * v_scale
    ref_pool, tri_pool = _fp8_pool(b.kv_cache, k_scale, v_scale), _fp8_pool(b.kv_cache, k_scale, v_scale)
    ref_backend = _scaled(TorchAttentionBackend(4, 2, 32, 32**-0.5), k_scale, v_scale)
    tri_backend = _scaled(triton_backend(4, 2, 32, 32**-0.5), k_scale, v_scale)
    if path == "store":
        want = ref_backend.forward(b.q, b.k, b.v, ref_pool, b.meta)
        got = tri_backend.forward(b.q, b.k, b.v, tri_pool, b.meta)
    else:  # position 0: rotary is the identity, the launches are the fused ones
        rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 32, 64, KERNELS).to(DEVICE)
        positions = torch.zeros(b.q.shape[0], dtype=torch.long, device=DEVICE)
        k, v = b.k.contiguous(), b.v.contiguous()
        want = ref_backend.forward_rotary(rope, positions, b.q.clone(), k, v, ref_pool, b.meta)
        got = tri_backend.forward_rotary(rope, positions, b.q.clone(), k, v, tri_pool, b.meta)
    assert torch.equal(tri_pool.view(torch.uint8), ref_pool.view(torch.uint8))  # the same bytes written
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4 * want.abs().max().item())

"""The fused Triton RMSNorm / residual-add + RMSNorm / SiLU·mul kernels against the torch code.

On CUDA the cases run on the GPU (the large ones are marked gpu); without CUDA fewer small ones run on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined). bf16 is
GPU-only: triton 3.6's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import activation, norm, triton_fused
from pdserve.kernels.split_k import Partials
from pdserve.layers.norm import RMSNorm

from .triton_env import BF16, DEVICE, DTYPES, HAS_TRITON, build, gpu, grid, interpreted_or_skip

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
EPS = 1e-6


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    if HAS_TRITON:
        interpreted_or_skip(triton_fused._rms_norm_kernel)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype=dtype, device=DEVICE)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to two roundings of the output dtype: the row sum's order and rsqrt differ slightly, and
    the normalized value is rounded before the weight multiplies it, as in torch."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out.dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


# on CPU: a row narrower than a block, several rows, and a row past 2048 columns (more warps)
SMALL_ROWS = grid([(7, 96), (5, 3000)], [(1, 64), (7, 96), (33, 896), (5, 3000)])
LARGE_ROWS = [pytest.param(s, marks=gpu) for s in [(1, 3584), (300, 3584), (2048, 5120), (4097, 8192)]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_ROWS + LARGE_ROWS, ids=str)
def test_add_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    x, residual = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, scale=3.0)
    weight = randn(shape[1], dtype=dtype)
    out, new_residual = triton_fused.triton_add_rms_norm(x, residual, weight, EPS)
    ref_residual = x + residual
    assert torch.equal(new_residual, ref_residual), "the residual sum must round exactly like torch"
    assert_close(out, norm.rms_norm(ref_residual, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", grid([3], [1, 2, 3]))
@pytest.mark.parametrize("shape", SMALL_ROWS + [pytest.param((128, 3584), marks=gpu)], ids=str)
def test_add_partials_rms_norm(shape: tuple[int, int], splits: int, dtype: torch.dtype) -> None:
    """split_k.Partials reduced in the norm's kernel: summed in order in fp32, rounded to the residual's
    dtype (as F.linear rounds its output), then added as test_add_rms_norm adds."""
    parts = randn(splits, *shape, dtype=torch.float32)
    residual, weight = randn(*shape, dtype=dtype, scale=3.0), randn(shape[1], dtype=dtype)
    out, new_residual = triton_fused.triton_add_partials_rms_norm(parts, residual, weight, EPS)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    ref_residual = total.to(dtype) + residual
    assert torch.equal(new_residual, ref_residual), "the sum must round exactly like the torch steps"
    assert_close(out, norm.rms_norm(ref_residual, weight, EPS))
    assert_close(_norm_with(weight).forward_residual(Partials(parts, dtype), residual)[0], out)


def _norm_with(weight: torch.Tensor) -> RMSNorm:
    layer = RMSNorm(weight.shape[0], EPS, build(triton=True)).to(device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL_ROWS + LARGE_ROWS, ids=str)
def test_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    x, weight = randn(*shape, dtype=dtype, scale=2.0), randn(shape[1], dtype=dtype)
    assert_close(triton_fused.triton_rms_norm(x, weight, EPS), norm.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_a_strided_view(dtype: torch.dtype) -> None:
    """Qwen3's q_norm: [T, heads, head_dim] sliced out of the fused qkv projection."""
    qkv = randn(9, 6 * 64, dtype=dtype)
    q = qkv[:, : 4 * 64].view(9, 4, 64)
    weight = randn(64, dtype=dtype)
    assert_close(triton_fused.triton_rms_norm(q, weight, EPS), norm.rms_norm(q, weight, EPS))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_rms_norm_fp32_weight_promotes(dtype: torch.dtype) -> None:
    x, weight = randn(4, 128, dtype=dtype), randn(128, dtype=torch.float32)
    assert_close(triton_fused.triton_rms_norm(x, weight, EPS), norm.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    grid([(7, 2 * 1000)], [(1, 128), (7, 2 * 1000), (40, 2 * 2048)])
    + [pytest.param(s, marks=gpu) for s in [(512, 2 * 18944)]],
)
def test_silu_and_mul(shape: tuple[int, int], dtype: torch.dtype) -> None:
    gate_up = randn(*shape, dtype=dtype, scale=3.0)
    assert_close(triton_fused.triton_silu_and_mul(gate_up), activation.silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 3])
def test_layers_dispatch(rows: int, dtype: torch.dtype) -> None:
    """RMSNorm and gate_up's SiLU * up give the torch results with the kernels the default config
    chooses on this device (Triton on CUDA, torch on CPU)."""
    kernels = build()
    layer = RMSNorm(256, EPS, kernels).to(device=DEVICE, dtype=dtype)
    torch.nn.init.normal_(layer.weight)
    x, residual = randn(rows, 256, dtype=dtype), randn(rows, 256, dtype=dtype)
    assert_close(layer(x), norm.rms_norm(x, layer.weight, EPS))
    out, new_residual = layer.forward_residual(x, residual)
    assert torch.equal(new_residual, x + residual)
    assert_close(out, norm.rms_norm(x + residual, layer.weight, EPS))
    x, w = randn(rows, 64, dtype=dtype), randn(512, 64, dtype=dtype, scale=0.1)
    assert_close(kernels.silu_mul_linear(x, w), activation.silu_and_mul(torch.nn.functional.linear(x, w)))

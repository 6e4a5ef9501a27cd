"""Down projections as K-split partial sums (kernels/split_k.py): what they sum to, and which products
take them (the tuning's shapes and row counts, CUDA, fp16/bf16, tp=1, KernelConfig split_norm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.distributed.group import TPGroup
from pdserve.kernels import split_k
from pdserve.layers.linear import RowParallelLinear

from .triton_env import CUDA, DEVICE, build, hopper_tuning


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_partials_sum_to_the_product(splits: int) -> None:
    x, w = torch.randn(5, 64, device=DEVICE), torch.randn(24, 64, device=DEVICE)
    got = split_k.partial_products(x, w, splits)
    assert got.parts.shape == (splits, 5, 24) and got.parts.dtype == torch.float32
    assert got.shape == (5, 24) and got.dtype == torch.float32
    for s in range(splits):
        cols = slice(s * 64 // splits, (s + 1) * 64 // splits)
        torch.testing.assert_close(got.parts[s], x[:, cols] @ w[:, cols].T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.total(), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_the_cpu_never_takes_them() -> None:
    x, w = torch.randn(128, 18944, dtype=torch.bfloat16), torch.empty(3584, 18944, dtype=torch.bfloat16)
    assert split_k.splits_for(x, w, hopper_tuning().split_k) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bf16_partials_sum_like_f_linear(dtype: torch.dtype) -> None:
    """On CUDA: the bmm's fp32 outputs; total() within a rounding of the plain product."""
    if not CUDA:
        pytest.skip("fp16/bf16 products in fp32 outputs: CUDA only")
    x = torch.randn(128, 4096, device=DEVICE, dtype=dtype)
    w = torch.randn(512, 4096, device=DEVICE, dtype=dtype) * 0.02
    got = split_k.partial_products(x, w, 2)
    assert got.parts.dtype == torch.float32 and got.total().dtype == dtype
    torch.testing.assert_close(got.total().float(), F.linear(x, w).float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize(
    "rows,dtype,enabled,taken",
    [
        (128, torch.bfloat16, True, 2),
        (72, torch.bfloat16, True, 2),
        (71, torch.bfloat16, True, 0),  # no gain measured at 64 rows: cuBLAS's own split-K
        (256, torch.bfloat16, True, 2),
        (257, torch.bfloat16, True, 0),
        (128, torch.float16, True, 2),
        (128, torch.float32, True, 0),
        (128, torch.bfloat16, False, 0),  # split_norm=off
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="split_k takes CUDA products only")
def test_forward_partials_only_for_measured_shapes_and_rows(
    rows: int, dtype: torch.dtype, enabled: bool, taken: int
) -> None:
    """Qwen2.5-7B's down_proj: split_k.Partials where the tuning says, else forward()'s tensor."""
    kernels = build(split_norm=enabled)
    down = RowParallelLinear(18944, 3584, (0, 18944), False, TPGroup.single(DEVICE), kernels)
    down = down.to(device=DEVICE, dtype=dtype)
    x = torch.randn(rows, 18944, device=DEVICE, dtype=dtype)
    got = down.forward_partials(x)
    if taken:
        assert isinstance(got, split_k.Partials) and got.parts.shape[0] == taken
        got = got.total()
    assert isinstance(got, torch.Tensor) and got.dtype == dtype
    torch.testing.assert_close(got.float(), F.linear(x, down.weight).float(), atol=3e-2, rtol=1.6e-2)
    strided = x.t().contiguous().t()  # the same values, column-major: the plain product
    assert split_k.splits_for(strided, down.weight, hopper_tuning().split_k) == 0

"""The Triton skinny GEMM against F.linear, and when the model's projections take it
(kernels/triton_linear.py, with the tuning file's tables).

On CUDA the cases run on the GPU; without CUDA fewer small ones run under Triton's interpreter (fp16:
the interpreter's bf16 tl.dot is wrong, see triton_env).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels import triton_skinny
from pdserve.kernels.pdl import ALWAYS, OFF, Pdl
from pdserve.kernels.sm_count import num_sms
from pdserve.kernels.tuning.tables import Tile

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

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SKINNY = hopper_tuning().skinny


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    interpreted_or_skip(triton_skinny._skinny_kernel)


def _check(m: int, n: int, k: int, dtype: torch.dtype, bias: bool = False, pdl: Pdl = OFF) -> None:
    torch.manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) * 0.05).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    got = triton_skinny.skinny_linear(x, w, triton_skinny.default_tile(n, SKINNY), b, pdl=pdl)
    want = x.float() @ w.float().T + (b.float() if b is not None else 0.0)
    assert got.dtype == dtype and got.shape == (m, n) and not got.isnan().any()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize(  # 32 rows: padded to 32 (the largest); ragged tiles; both K steps (n <= / > 8192)
    "m,n,k",
    grid(
        [(32, 100, 600), (3, 8200, 300)],
        [(m, n, k) for m in (1, 3, 8, 16, 32) for n, k in ((100, 600), (8200, 300))],
    ),
)
def test_matches_a_float32_matmul(m: int, n: int, k: int) -> None:
    _check(m, n, k, torch.float16)


@pytest.mark.parametrize("m", grid([8], [1, 8]))
def test_bias_is_added_per_column(m: int) -> None:
    _check(m, 100, 600, torch.float16, bias=True)


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize(
    "n,k",
    [
        pytest.param(3584, 3584, marks=gpu),
        pytest.param(37888, 3584, marks=gpu),
        pytest.param(3584, 18944, marks=gpu),
    ],
)
def test_qwen_7b_projections_in_bf16(m: int, n: int, k: int) -> None:
    _check(m, n, k, torch.bfloat16)


def _check_gated(m: int, inter: int, k: int, dtype: torch.dtype, tile: Tile | None, pdl: Pdl = OFF) -> None:
    torch.manual_seed(m * 5 + inter + k)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(2 * inter, k, device=DEVICE) * 0.05).to(dtype)
    tile = tile or triton_skinny.default_tile(2 * inter, SKINNY)
    got = triton_skinny.skinny_linear(x, w, tile, gated=True, pdl=pdl)
    gate, up = (x.float() @ w.float().T).to(dtype).float().chunk(2, dim=-1)
    want = F.silu(gate).to(dtype).float() * up
    assert got.dtype == dtype and got.shape == (m, inter) and not got.isnan().any()
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("m", grid([5], [1, 5, 16]))
@pytest.mark.parametrize("inter,k,tile", [(48, 600, (32, 256, 2, 4)), (200, 300, (64, 256, 2, 4))])
def test_gated_gives_silu_of_the_gate_times_the_up_product(
    m: int, inter: int, k: int, tile: tuple[int, int, int, int]
) -> None:
    """Ragged intermediate sizes (48: programs of 16 columns straddle nothing; 200: the last of 32 is cut)."""
    _check_gated(m, inter, k, torch.float16, tile)


@pytest.mark.parametrize("m", [1, 8, 32])
@pytest.mark.parametrize(  # Qwen2.5-7B, -32B gate_up
    "inter,k", [pytest.param(18944, 3584, marks=gpu), pytest.param(27648, 5120, marks=gpu)]
)
def test_gated_on_qwen_gate_up_in_bf16(m: int, inter: int, k: int) -> None:
    _check_gated(m, inter, k, torch.bfloat16, triton_skinny.plan(2 * inter, num_sms(DEVICE), 1, SKINNY))


@pytest.mark.parametrize("m", [17, 32, 33, 64])
@pytest.mark.parametrize(  # Qwen2.5-7B, -32B, Qwen3-32B, Llama-3.1-8B gate_up
    "inter,k",
    [
        pytest.param(*shape, marks=gpu)
        for shape in [(18944, 3584), (27648, 5120), (25600, 5120), (14336, 4096)]
    ],
)
def test_gated_past_16_rows_on_measured_gate_up_shapes_in_bf16(m: int, inter: int, k: int) -> None:
    """Every tile of gated_tiles on its shape (rows a shape leaves to cuBLAS take its 64-row tile here)."""
    tile = triton_skinny.gated_plan(2 * inter, k, m, SKINNY) or triton_skinny.gated_plan(
        2 * inter, k, 64, SKINNY
    )
    _check_gated(m, inter, k, torch.bfloat16, tile)


def test_gated_plan_takes_only_measured_shapes_and_rows() -> None:
    assert triton_skinny.gated_plan(2 * 18944, 3584, 17, SKINNY) == (128, 64, 3, 4)  # 7B
    assert triton_skinny.gated_plan(2 * 18944, 3584, 40, SKINNY) is None
    assert triton_skinny.gated_plan(2 * 18944, 3584, 49, SKINNY) == (64, 64, 4, 4)
    assert triton_skinny.gated_plan(2 * 18944, 3584, 65, SKINNY) is None
    assert triton_skinny.gated_plan(2 * 27648, 5120, 32, SKINNY) == (256, 128, 3, 8)  # 32B
    assert triton_skinny.gated_plan(2 * 27648, 5120, 64, SKINNY) == (128, 64, 4, 4)
    assert triton_skinny.gated_plan(2 * 25600, 5120, 32, SKINNY) == (256, 128, 3, 8)  # Qwen3-32B
    assert triton_skinny.gated_plan(2 * 25600, 5120, 48, SKINNY) == (128, 64, 4, 4)
    assert triton_skinny.gated_plan(2 * 12288, 4096, 64, SKINNY) is None  # Qwen3-8B: no gain measured
    assert triton_skinny.gated_plan(2 * 14336, 4096, 32, SKINNY) is None  # Llama-3.1-8B
    assert triton_skinny.gated_plan(2 * 14336, 4096, 33, SKINNY) == (128, 128, 4, 4)


@pytest.mark.parametrize("gated", grid([True], [False, True]))
@pytest.mark.parametrize("m", grid([1], [1, 32]))
def test_programmatic_dependent_launch_gives_the_same_product(m: int, gated: bool) -> None:
    """With PDL on (the default) the kernel first waits for the one before it (kernels/pdl.py): on a GPU
    each product right after the one it reads; without a GPU PDL stays off and this is the plain path."""
    if gated:
        _check_gated(m, 200, 300, torch.float16, (64, 256, 2, 4), pdl=ALWAYS)
    else:
        _check(m, 100, 600, torch.float16, pdl=ALWAYS)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="linear() picks the kernel for CUDA tensors only")
def test_silu_mul_linear_fuses_where_the_plain_product_would_take_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = build(skinny_gemm=True, gated_rows=True)
    calls = []
    real = triton_skinny.skinny_linear

    def spy(x: torch.Tensor, w: torch.Tensor, tile: Tile, **kw: object) -> torch.Tensor:
        calls.append((tile, {k: v for k, v in kw.items() if k != "pdl"}))
        return real(x, w, tile, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_skinny, "skinny_linear", spy)
    wide = torch.randn(2 * 27648, 5120, device=DEVICE, dtype=torch.bfloat16) * 0.02  # 32B: 64 wide
    narrow = torch.randn(2 * 18944, 3584, device=DEVICE, dtype=torch.bfloat16) * 0.02  # 7B: 32 wide
    fused = {"gated": True}
    for rows, w, want in [
        (1, wide, [fused]),
        (16, wide, [fused]),
        (32, wide, [((256, 128, 3, 8), fused)]),  # plan(): several waves -> gated_rows_tile
        (33, wide, [((128, 64, 4, 4), fused)]),  # gated_rows_tile
        (1, narrow, [{}]),  # the kernel, unfused: 16 + 16 columns a program were slower
        (24, narrow, [((128, 64, 3, 4), fused)]),
        (48, narrow, []),
        (64, narrow, [((64, 64, 4, 4), fused)]),
        (65, narrow, []),  # cuBLAS, then silu_and_mul
    ]:
        calls.clear()
        x = torch.randn(rows, w.shape[1], device=DEVICE, dtype=torch.bfloat16)
        got = kernels.silu_mul_linear(x, w)
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        torch.testing.assert_close(got.float(), (F.silu(gate) * up).float(), atol=0.05, rtol=0.02)
        seen = [kw if rows <= 16 else (tile, kw) for tile, kw in calls]
        assert seen == want, (rows, w.shape)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="linear() picks the kernel for CUDA tensors only")
def test_linear_takes_the_kernel_for_few_rows_of_large_bias_free_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = build(skinny_gemm=True)
    calls = []
    real = triton_skinny.skinny_linear
    monkeypatch.setattr(
        triton_skinny,
        "skinny_linear",
        lambda x, w, tile, **kw: calls.append(x.shape[0]) or real(x, w, tile, **kw),
    )
    w = torch.randn(3584, 3584, device=DEVICE, dtype=torch.bfloat16) * 0.02
    wide = torch.randn(5120, 3584, device=DEVICE, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(3584, device=DEVICE, dtype=torch.bfloat16)
    for rows, kw, weight, taken in [
        (1, {}, w, True),
        (16, {}, w, True),
        (32, {}, w, True),  # one wave of programs: up to 32 rows
        (33, {}, w, False),  # more rows: cuBLAS
        (
            1,
            {},
            wide,
            triton_skinny.plan(5120, num_sms(wide.device), 1, SKINNY) is not None,
        ),  # None on 132 SMs
        (1, {"bias": bias}, w, False),
        (1, {}, w.float(), False),  # fp32: cuBLAS
        (1, {}, w[:1024], False),  # a small weight: cuBLAS
    ]:
        calls.clear()
        x = torch.randn(rows, 3584, device=DEVICE, dtype=weight.dtype)
        got = kernels.linear(x, weight, kw.get("bias"))
        torch.testing.assert_close(got.float(), F.linear(x, weight, **kw).float(), atol=0.05, rtol=0.02)
        assert bool(calls) is taken, (rows, kw.keys(), weight.shape, weight.dtype)
    calls.clear()
    build(skinny_gemm=False).linear(torch.randn(1, 3584, device=DEVICE, dtype=torch.bfloat16), w, None)
    assert not calls


@pytest.mark.parametrize(
    "n,sms,rows,tile",
    [
        (3584, 132, 1, (32, 512, 4, 4)),  # Qwen2.5-7B o/down: 112 programs, one wave 85% full
        (3584, 132, 32, (32, 512, 4, 4)),  # one wave: up to 32 rows
        (37888, 132, 16, (32, 256, 4, 4)),  # 7B gate_up: 1184 programs in 9 waves (64 wide: 90% full)
        (37888, 132, 17, None),  # several waves past 16 rows: cuBLAS
        (55296, 132, 1, (64, 256, 4, 4)),  # 32B gate_up: 94% full 32 or 64 wide; the wider wins ties
        (5120, 132, 1, None),  # 32B o/down: 61% full 32 or 64 wide -> cuBLAS
        (4608, 144, 1, (32, 512, 4, 4)),  # 144 programs on a GPU with 144 SMs: exactly one wave
    ],
)
def test_plan_takes_the_kernel_only_where_its_waves_fill_the_sms(
    n: int, sms: int, rows: int, tile: tuple[int, int, int, int] | None
) -> None:
    assert triton_skinny.plan(n, sms, rows, SKINNY) == tile

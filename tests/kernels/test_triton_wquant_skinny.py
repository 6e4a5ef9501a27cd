"""The decode-rows quantized GEMM (kernels/triton_wquant_skinny.py), its plan (triton_wquant_plan.py) and
the routing of triton_wquant_choice.py against the reference of layers/quant.py (dequantize, then a
float matmul): wint8, wint4 and fp8 weight-only, N ragged against every tile, K with a partial wint4
group and partial split spans, one row (CUDA cores) and 2-16 rows (tensor cores), split-K partials
reduced by the second launch, bias; then the tile and dequantize-then-F.linear routes at more rows.

Under Triton's interpreter on CPU (float32: exact products; float16 with bias once); on CUDA too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels import fp8
from pdserve.kernels.triton_wquant_plan import SkinnyPlan, plan, route
from pdserve.layers.quant import dequantize, quantize

from .triton_env import CUDA, DEVICE, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    from pdserve.kernels import triton_wquant_skinny

    from .triton_env import interpreted_or_skip

    interpreted_or_skip(triton_wquant_skinny._wq_skinny_kernel)


def _case(method: str, m: int, n: int, k: int, dtype: torch.dtype, bias: bool = False):  # type: ignore[no-untyped-def]
    torch.manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = quantize(torch.randn(n, k, device=DEVICE) * 0.05, method)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    want = F.linear(x.float(), dequantize(w), None if b is None else b.float())
    return x, w, b, want


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


# N 40: ragged against 16/32/64; K 576: wint4's last group is 64 wide, and a 256-input span splits K
# into 256 + 256 + 64 (three partials reduced); BLOCK_K 64 and 128 inside one group
@pytest.mark.parametrize("method", ["wint8", "wint4", "fp8"])
@pytest.mark.parametrize(
    "m,block_n,span,block_k",
    [(1, 32, 256, 128), (1, 16, 640, 64), (3, 16, 256, 64), (16, 64, 640, 128), (9, 32, 384, 128)],
)
def test_skinny_matches_the_dequantized_matmul(
    method: str, m: int, block_n: int, span: int, block_k: int
) -> None:
    """Both ways of loading the weight: a step ahead in registers, and each step's own loads."""
    from pdserve.kernels.triton_wquant_skinny import wq_skinny_linear

    x, w, _, want = _case(method, m, 40, 576, torch.float32)
    for prefetch in (True, False):
        tiles = SkinnyPlan(block_n, span, block_k, 2, 4, dot=m > 1, prefetch=prefetch)
        _close(wq_skinny_linear(x, w.data, w.scale, method, tiles), want, torch.float32)


@pytest.mark.parametrize("method", ["wint8", "wint4", "fp8"])
@pytest.mark.parametrize("span", [256, 640])  # the bias in the reduce launch, and in the single pass
def test_skinny_half_precision_and_bias(method: str, span: int) -> None:
    from pdserve.kernels.triton_wquant_skinny import wq_skinny_linear

    dtype = torch.bfloat16 if CUDA else torch.float16
    for m in (1, 4):
        x, w, b, want = _case(method, m, 48, 576, dtype, bias=True)
        tiles = SkinnyPlan(32, span, 128, 2, 4, dot=m > 1)
        _close(wq_skinny_linear(x, w.data, w.scale, method, tiles, b), want, dtype)


def test_plan_fills_the_sms_and_keeps_to_the_kernel_limits() -> None:
    """plan(): spans are whole wint4 groups and cover K, a step stays in one group, the grid reaches
    most SMs on the 7B shapes (down_proj: N 3584 needs a K split), one row runs without the dot."""
    shapes = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
    for fmt in ("wint8", "wint4", "fp8"):
        for n, k in shapes.values():
            for rows in (1, 2, 16, 64, 128):
                p = plan(fmt, n, k, rows, 132)
                assert p.span % 128 == 0 and p.dot == (rows > 1)
                assert fmt != "wint4" or 128 % p.block_k == 0  # one group's scale a step
                programs = -(-n // p.block_n) * -(-k // p.span)
                assert programs >= 0.5 * 132, (fmt, n, k, rows, p)
                assert p.block_n * max(16, rows) <= 8192  # the float32 accumulator's registers
    assert -(-18944 // plan("wint4", 3584, 18944, 1, 132).span) > 1


def test_route_cuts() -> None:
    assert [route("wint4", m) for m in (1, 128, 129, 1023, 1024)] == [
        "skinny", "skinny", "tiles", "tiles", "dequant"
    ]  # fmt: skip
    assert [route("fp8", m) for m in (1, 16, 17)] == ["skinny", "skinny", "scaled_mm"]


@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_every_route_matches_the_dequantized_matmul(method: str) -> None:
    """wint_linear at 5 (skinny, plan()'s tiles), 130 (the tile kernel) and 1024 rows (the weight
    dequantized by one launch, then F.linear), x 3-D."""
    from pdserve.kernels.triton_wquant_choice import wint_linear

    for m in (5, 130, 1024):
        x, w, _, want = _case(method, m, 40, 576, torch.float32)
        got = wint_linear(x.view(1, m, 576), w.data, w.scale)
        _close(got.view(m, 40), want, torch.float32)


def test_fp8_decode_rows_are_weight_only_and_wider_batches_quantize_x() -> None:
    """Fp8Linear: up to 16 rows the skinny kernel on the unquantized x (weight-only), past that the
    activation-quantized product it wraps (here the emulation)."""
    from pdserve.kernels.triton_wquant_choice import Fp8Linear

    product = Fp8Linear(fp8.emulated_linear, skinny=True)
    x, w, _, want = _case("fp8", 16, 40, 576, torch.float32)
    _close(product(x, w.data, w.scale), want, torch.float32)
    x = torch.randn(17, 576, device=DEVICE)
    assert torch.equal(product(x, w.data, w.scale), fp8.emulated_linear(x, w.data, w.scale))


def test_the_factory_binds_the_routed_products() -> None:
    """build_kernels with Triton chosen: Kernels.wint_linear is the routed product (layers/quant.py's
    quant_linear goes through it and matches the reference); fp8 keeps the emulation where there are
    no fp8 tensor cores (the CPU), and on a GPU with them takes the skinny kernel at decode rows."""
    from pdserve.kernels import triton_wquant_choice
    from pdserve.layers.quant import quant_linear

    from .triton_env import build

    kernels = build(triton=True)
    assert kernels.wint_linear is triton_wquant_choice.wint_linear
    x, w, _, want = _case("wint4", 2, 40, 576, torch.float32)
    _close(quant_linear(kernels, x, w, None), want, torch.float32)
    if fp8.has_fp8_mm(DEVICE):
        assert isinstance(kernels.fp8_linear, triton_wquant_choice.Fp8Linear) and kernels.fp8_linear.skinny
    else:
        assert kernels.fp8_linear is fp8.emulated_linear

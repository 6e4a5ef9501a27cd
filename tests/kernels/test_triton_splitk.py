"""The Triton split-K GEMM for 33-128 rows against F.linear, its locks, its plan, and when linear()
takes it.

On CUDA the cases run on the GPU; without CUDA the small ones run under Triton's interpreter (fp16:
the interpreter's bf16 tl.dot is wrong, see triton_env). The interpreter runs a grid's programs one
after another, so there the last program to arrive is always the last split; on a GPU any may be.
"""

from __future__ import annotations

import pytest
import torch

from .triton_env import CUDA, DEVICE, HAS_TRITON, fix_interpreter, gpu

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    from pdserve.layers import triton_splitk

    if not CUDA:
        if type(triton_splitk._splitk_kernel).__name__ != "InterpretedFunction":
            pytest.skip("the kernel was defined before TRITON_INTERPRET=1 was set")
        fix_interpreter()


def _inputs(m: int, n: int, k: int, bias: bool, dtype: torch.dtype = torch.float16):
    torch.manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) * 0.05).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def _close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    want = x.float() @ w.float().T + (b.float() if b is not None else 0.0)
    assert got.dtype == x.dtype and got.shape == want.shape and not got.isnan().any()
    tol = 1e-2 if x.dtype == torch.float16 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("m", [33, 64, 100])
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_matches_a_float32_matmul(m: int, splits: int, bias: bool) -> None:
    """Ragged rows and columns: 200 columns in 64-wide tiles; K = 640, 10 steps of 64 split 1-3
    ways (3: 4, 4 and 2 steps)."""
    from pdserve.layers.triton_splitk import splitk_linear

    x, w, b = _inputs(m, 200, 640, bias)
    _close(splitk_linear(x, w, b, (64, 64, splits, 2, 4)), x, w, b)


def test_every_call_leaves_the_locks_at_zero_and_repeats_itself() -> None:
    from pdserve.layers import triton_splitk

    x, w, _ = _inputs(40, 130, 512, False)
    first = triton_splitk.splitk_linear(x, w, None, (64, 64, 4, 2, 4))
    again = triton_splitk.splitk_linear(x, w, None, (64, 64, 4, 2, 4))
    _, locks = triton_splitk._device_buffers(x.device)
    assert torch.equal(first, again)
    assert not locks.any()


def test_plan_fills_one_wave_and_leaves_what_it_cannot_to_cublas() -> None:
    from pdserve.layers.triton_splitk import MIN_FILL, plan

    down = plan(3584, 18944, 132)  # Qwen2.5-7B down_proj
    assert down is not None
    block_n, _, splits, _, _ = down
    assert MIN_FILL * 132 <= -(-3584 // block_n) * splits <= 132
    assert plan(37888, 3584, 132) is None  # 7B gate_up: its tiles alone take more than a wave
    assert plan(256, 64, 132) is None  # a few tiles, too short to split: the SMs would idle
    assert plan(4608, 3584, 132, 64) == (128, 64, 3, 4, 8)  # 7B qkv: 36 tiles of 128, 3 splits
    assert plan(4608, 3584, 132, 128) is None  # 72 tiles of 64 (no 128 past 64 rows): 55% of a wave


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="linear() picks the kernel for CUDA tensors only")
def test_linear_takes_it_for_33_to_128_rows_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve.layers import linear as linear_module
    from pdserve.layers import triton_splitk

    monkeypatch.setattr(triton_splitk, "ENABLED", True)
    calls = []
    real = triton_splitk.splitk_linear
    monkeypatch.setattr(triton_splitk, "splitk_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w = torch.randn(3584, 3584, device=DEVICE, dtype=torch.bfloat16) * 0.02
    for rows in (16, 33, 128, 129):
        x = torch.randn(rows, 3584, device=DEVICE, dtype=torch.bfloat16)
        _close(linear_module.linear(x, w), x, w, None)
    ragged = torch.randn(3584, 3600, device=DEVICE, dtype=torch.bfloat16) * 0.02  # K: 56.25 steps
    x = torch.randn(64, 3600, device=DEVICE, dtype=torch.bfloat16)
    _close(linear_module.linear(x, ragged), x, ragged, None)
    assert calls == [33, 128]


@pytest.mark.parametrize(
    "n,k,bias",
    [
        pytest.param(4608, 3584, True, marks=gpu),  # Qwen2.5-7B qkv, o, down
        pytest.param(3584, 3584, False, marks=gpu),
        pytest.param(3584, 18944, False, marks=gpu),
        pytest.param(5120, 27648, False, marks=gpu),  # 32B down
    ],
)
@pytest.mark.parametrize("m", [33, 128])
def test_model_shapes_with_their_plan_in_bf16_and_under_a_graph(m: int, n: int, k: int, bias: bool) -> None:
    """The planned tile (or two splits of 64 columns) on the real shapes, plain and replayed from a
    CUDA graph twice (the locks must be back at zero for each replay)."""
    from pdserve.layers.sm_count import num_sms
    from pdserve.layers.triton_splitk import plan, splitk_linear

    x, w, b = _inputs(m, n, k, bias, torch.bfloat16)
    tile = plan(n, k, num_sms(x.device), m) or (64, 64, 2, 4, 8)  # where plan() leaves it to cuBLAS
    _close(splitk_linear(x, w, b, tile), x, w, b)
    out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(splitk_linear(x, w, b, tile))
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _close(out, x, w, b)

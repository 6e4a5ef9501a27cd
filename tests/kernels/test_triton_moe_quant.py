"""The fused MoE with quantized experts (kernels/triton_moe_quant.py) against the torch reference
(layers/moe.experts_torch) on the experts' dequantized weights, for wint8, wint4 and fp8: decode tiles
with an intermediate size that ends in a part-filled wint4 group and no tile divides, prefill tiles,
half precision. Then the layer: FusedExperts quantized with Triton chosen runs the fused kernel (fp8
tells it from the reference loop, which rounds activations through e4m3), and on a GPU its forward is
captured in a CUDA graph and replayed with other tokens and routing. Under the interpreter on CPU with
tiny shapes; the qwen3-30b-a3b / ernie-4.5-21b-a3b expert shapes and bf16 on a GPU (`gpu`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from pdserve.distributed.group import TPGroup
from pdserve.layers.quant import QuantizedWeight, dequantize, quantize

from .test_triton_moe import routed
from .triton_env import BF16, CUDA, DEVICE, HAS_TRITON, build, gpu, grid, interpreted_or_skip

if TYPE_CHECKING:
    from pdserve.kernels.triton_moe import MoeTiles

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
METHODS = ["wint8", "wint4", "fp8"]


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    from pdserve.kernels import triton_moe_quant

    interpreted_or_skip(triton_moe_quant._moe_quant_kernel)


def _stacks(method: str, experts: int, hidden: int, inter: int) -> tuple[QuantizedWeight, QuantizedWeight]:
    """gate_up [E*2I, H] and down [E*H, I] quantized as FusedExperts.quantize stores them."""
    gen = torch.Generator().manual_seed(experts * hidden + inter)
    w13 = torch.randn(experts * 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts * hidden, inter, generator=gen) / inter**0.5
    return quantize(w13.to(DEVICE), method), quantize(w2.to(DEVICE), method)


def _check(method: str, shape: tuple[int, ...], dtype: torch.dtype, tiles: MoeTiles | None) -> None:
    from pdserve.kernels.triton_moe_quant import fused_moe_quant
    from pdserve.layers.moe import experts_torch, per_expert

    tokens, experts, top_k, hidden, inter = shape
    q13, q2 = _stacks(method, experts, hidden, inter)
    ids, weights = routed(tokens, experts, top_k, seed=3)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    weights = weights.to(dtype)
    got = fused_moe_quant(x, *per_expert(q13, experts), *per_expert(q2, experts), ids, weights, tiles)
    w13 = dequantize(q13, dtype).view(experts, 2 * inter, hidden)
    w2 = dequantize(q2, dtype).view(experts, hidden, inter)
    ref = experts_torch(x, w13, w2, ids, weights)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)


def _cpu_tiles(tokens: int, experts: int, top_k: int) -> MoeTiles | None:
    """Under the interpreter tiles as small as tl.dot takes (a wint4 step's half still 16 wide), so a
    few programs cover each case; the sizes' own choice (decode or prefill tiles) on a GPU."""
    from pdserve.kernels.triton_moe import MoeTiles

    if CUDA:
        return None
    big = tokens * top_k >= 32 * experts
    return MoeTiles(block_m=32 if big else 16, gate_up_n=16, down_n=16, block_k=32)


# I = 200: down's inputs end in a 72-wide wint4 group, and no N tile divides 200
SMALL = grid(
    [(3, 4, 2, 128, 200), (40, 2, 2, 128, 64)],  # decode tiles; prefill tiles
    [(3, 4, 2, 128, 200), (40, 2, 2, 128, 64), (300, 16, 4, 256, 200)],
)
LARGE = [  # the qwen3-30b-a3b and ernie-4.5-21b-a3b expert shapes, one layer, their own tiles
    pytest.param(s, marks=gpu)
    for s in [
        (1, 128, 8, 2048, 768),
        (32, 128, 8, 2048, 768),
        (128, 128, 8, 2048, 768),
        (4096, 64, 6, 2560, 1536),
    ]
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SMALL + LARGE, ids=str)
def test_quantized_fused_moe_equals_the_dequantized_reference(method, shape):
    dtype = torch.bfloat16 if CUDA and shape[3] > 256 else torch.float32
    _check(method, shape, dtype, _cpu_tiles(*shape[:3]))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
@pytest.mark.parametrize("method", METHODS)
def test_quantized_fused_moe_in_half_precision(method, dtype):
    shape = (5, 4, 2, 128, 64)
    _check(method, shape, dtype, _cpu_tiles(*shape[:3]))


def _experts(method: str, experts: int, hidden: int, inter: int) -> torch.nn.Module:
    """A FusedExperts with Triton chosen (the interpreter on CPU), random weights, quantized."""
    from pdserve.layers.moe import FusedExperts, fused_moe_for

    kernels = build(triton=True)
    layer = FusedExperts(experts, hidden, inter, TPGroup.single(DEVICE), fused_moe_for(kernels), kernels)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.gate_up_proj.copy_(torch.randn(layer.gate_up_proj.shape, generator=gen) / hidden**0.5)
        layer.down_proj.copy_(torch.randn(layer.down_proj.shape, generator=gen) / inter**0.5)
    layer.to(DEVICE).quantize(method)
    return layer


@pytest.mark.parametrize("method", METHODS)
def test_quantized_experts_layer_runs_the_fused_kernel(method):
    """fp8 fails through the reference loop (it rounds each expert's input through e4m3)."""
    from pdserve.layers.moe import experts_torch

    experts, hidden, inter, tokens = 4, 128, 64, 3
    layer = _experts(method, experts, hidden, inter)
    ids, weights = routed(tokens, experts, 2, seed=6)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    w13 = dequantize(layer.q13).view(experts, 2 * inter, hidden)
    w2 = dequantize(layer.q2).view(experts, hidden, inter)
    ref = experts_torch(x, w13, w2, ids, weights)
    torch.testing.assert_close(layer(x, ids, weights), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_quantized_experts_capture_in_a_cuda_graph(method):
    """No host sync and sizes known on the host: the graph replays other tokens' routing correctly."""
    from pdserve.layers.moe import experts_torch

    experts, hidden, inter, tokens = 64, 1024, 384, 8
    layer = _experts(method, experts, hidden, inter)
    x = torch.zeros(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.zeros(tokens, 4, device=DEVICE, dtype=torch.int64)
    weights = torch.zeros(tokens, 4, device=DEVICE, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x, ids, weights)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x, ids, weights)
    w13 = dequantize(layer.q13, torch.bfloat16).view(experts, 2 * inter, hidden)
    w2 = dequantize(layer.q2, torch.bfloat16).view(experts, hidden, inter)
    for seed in (8, 9):
        new_ids, new_weights = routed(tokens, experts, 4, seed=seed)
        x.copy_(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(DEVICE))
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        graph.replay()
        ref = experts_torch(x, w13, w2, ids, weights)
        torch.testing.assert_close(y, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)

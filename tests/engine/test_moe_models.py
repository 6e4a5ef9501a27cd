"""Mixture-of-experts architectures (Qwen3-MoE, Qwen2-MoE with its gated shared expert, ERNIE-4.5 MoE
with shared experts, dense first layer and score-correction bias) and ERNIE-4.5 dense (interleaved
rotary): the engine's greedy output equals transformers' (float32) for small random-weight models
written by transformers, colocated; Qwen2-MoE also at tensor_parallel_size=2 (experts' intermediate
dimension split over two Gloo ranks) and ERNIE-4.5 MoE disaggregated (one prefill, one decode engine).
With --quantization wint8 / wint4 the experts are quantized per expert as they load: the greedy output
equals transformers' with every projection and expert replaced by its quantized-then-dequantized value.
The shipped MoE shapes build with their published parameter counts. On a GPU (`gpu`) the same
comparisons run through the fused Triton MoE (quantized experts read as they are stored).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pdserve import SamplingParams
from pdserve.models.prepare import resolve_model

from .tiny_models import TEXTS, engine_greedy, hf_greedy_ids, save_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
MOE = dict(moe_intermediate_size=64, head_dim=32)  # 4 experts, top-2, in all four MoE layers or three
ARCHS: dict[str, dict] = {
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        **MOE,
    ),
    "qwen2_moe": dict(  # norm_topk_prob false (the default): raw softmax weights
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=96,
        moe_intermediate_size=64,
    ),
    "ernie4_5_moe": dict(  # layer 0 dense, 1-3 MoE
        architectures=["Ernie4_5_MoeForCausalLM"], moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, **MOE
    ),
    "ernie4_5": dict(architectures=["Ernie4_5ForCausalLM"], head_dim=32),
}
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


def _write(arch: str, path: str) -> str:
    save_tiny_model(path, arch, **ARCHS[arch])
    if arch == "ernie4_5_moe":  # a non-zero correction bias, so that it changes which experts are picked
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(
                    0, 0.05, generator=torch.manual_seed(1)
                )
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Callable[[str], tuple[str, list[list[int]], list[list[int]]]]:
    """arch -> (model dir, prompts, transformers' greedy tokens), each built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built: dict[str, tuple[str, list[list[int]], list[list[int]]]] = {}

    def get(arch: str) -> tuple[str, list[list[int]], list[list[int]]]:
        if arch not in built:
            path = _write(arch, str(tmp_path_factory.mktemp(arch)))
            tok = AutoTokenizer.from_pretrained(path)
            prompts = [tok.encode(t)[: 5 + 3 * i] for i, t in enumerate(TEXTS[:6])]
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            ref = hf_greedy_ids(model, prompts, max_new_tokens=12)
            assert len({tuple(r) for r in ref}) > 3  # the prompts lead to different outputs
            built[arch] = (path, prompts, ref)
        return built[arch]

    return get


def _dequantized_greedy(path: str, prompts: list[list[int]], method: str) -> list[list[int]]:
    """transformers' greedy tokens with the projections (shared experts' included) and the stacked
    routed experts ([E, 2I, H], [E, H, I]: quantized along their last dim, per expert and row)
    replaced by their `method` quantized-then-dequantized weights; routers and embeddings as they are."""
    from transformers import AutoModelForCausalLM

    from .test_quantization import FAKE, PROJ

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2]
            if (module in PROJ and name.endswith(".weight")) or name.endswith(
                ("experts.gate_up_proj", "experts.down_proj")
            ):
                p.copy_(FAKE[method](p.reshape(-1, p.shape[-1])).view_as(p))
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
            out.append(y[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("device", ["cpu", CUDA])  # cuda: the fused MoE reads the quantized experts
@pytest.mark.parametrize(
    ("arch", "method"), [("qwen3_moe", "wint4"), ("qwen3_moe", "wint8"), ("qwen2_moe", "wint8")]
)
def test_quantized_experts_equal_the_dequantized_model(tiny, arch, method, device):
    path, prompts, ref = tiny(arch)
    want = _dequantized_greedy(path, prompts, method)
    assert _greedy(path, prompts, quantization=method, device=device) == want
    if method == "wint4":  # the comparison can tell quantized experts from float ones
        assert want != ref


def _greedy(path: str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    return engine_greedy(path, prompts, max_tokens=12, block_size=8, **kwargs)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_transformers(tiny, arch, device):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    path, prompts, ref = tiny(arch)
    assert _greedy(path, prompts, device=device) == ref


def test_ernie_moe_disaggregated_equals_transformers(tiny):
    path, prompts, ref = tiny("ernie4_5_moe")
    assert _greedy(path, prompts, prefill=1, decode=1) == ref


def test_qwen2_moe_tensor_parallel_equals_transformers(tiny):
    """Each rank holds half of every expert's (and the shared expert's) intermediate columns; chunked
    prefill (5 tokens a step) on top."""
    path, prompts, ref = tiny("qwen2_moe")
    assert _greedy(path, prompts, tensor_parallel_size=2, max_num_batched_tokens=5) == ref


@pytest.mark.parametrize(
    "name,total,active",
    [("qwen3-30b-a3b", 30.5, 3.3), ("ernie-4.5-21b-a3b", 21.8, 3.3), ("ernie-4.5-300b-a47b", 299.5, 47.9)],
)
def test_shipped_moe_shapes_have_their_published_sizes(name, total, active):
    """Built on the meta device (no memory): total parameters, and those a token uses (every weight
    outside the routed experts plus top-k of E experts' share), in billions."""
    from transformers import AutoConfig

    from pdserve.distributed.group import TPGroup
    from pdserve.kernels.config import KernelConfig
    from pdserve.kernels.factory import build_kernels
    from pdserve.layers.moe import FusedExperts
    from pdserve.models.registry import model_class

    cfg = AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        model = model_class(cfg)(cfg, build_kernels(KernelConfig(), torch.device("cpu")), TPGroup.single())
    params = sum(p.numel() for p in model.parameters())
    blocks = [m for m in model.modules() if isinstance(m, FusedExperts)]
    routed = sum(p.numel() for b in blocks for p in b.parameters())
    used = params - routed + routed * cfg.num_experts_per_tok / blocks[0].num_experts
    assert params / 1e9 == pytest.approx(total, abs=0.1) and used / 1e9 == pytest.approx(active, abs=0.1)


@pytest.mark.slow  # two worker processes: ~10 s on 2 cores; the formats' proof is the test above
def test_quantized_experts_tensor_parallel_hold_the_tp1_model(tiny):
    """TP 2, wint8: each rank quantizes its half of every expert; down_proj's rows are scaled by the
    full row's max |w| (gathered over the ranks), so the ranks run the tp=1 quantized model."""
    path, prompts, _ = tiny("qwen2_moe")
    want = _dequantized_greedy(path, prompts, "wint8")
    assert _greedy(path, prompts, quantization="wint8", tensor_parallel_size=2) == want

"""Every architecture (Llama with Llama 3.1's rope scaling, Qwen2 with qkv bias, Qwen3 with q/k norm): the
engine's greedy output equals transformers' (float32) for small random-weight models, colocated and
disaggregated (in-process and tcp transports), on the CPU and, where there is one, on a CUDA GPU (marked
`gpu`); bf16 on CUDA runs clean.

Models are built here from configs (random weights, a tokenizer trained on the spot), so nothing is
downloaded and no checkpoint is needed.
"""

from __future__ import annotations

import pytest
import torch

from .tiny_models import TEXTS, hf_greedy_ids, save_tiny_model

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)

ARCHS = {
    "llama": dict(  # Llama 3.1's scaled rope: most of the 16 frequencies here are past its low-frequency cut
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    ),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=64),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tmp_path_factory) -> str:
    extra = dict(ARCHS[request.param])
    return save_tiny_model(str(tmp_path_factory.mktemp(request.param)), extra.pop("model_type"), **extra)


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(t)[: 5 + 3 * i] for i, t in enumerate(TEXTS[:10])]


@pytest.fixture(scope="module", params=["cpu", CUDA])
def device(request) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def reference(model_dir, prompts, device) -> list[list[int]]:
    return _reference(model_dir, prompts, device)


def _reference(model_dir, prompts, device) -> list[list[int]]:
    """transformers' greedy tokens, float32, on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return hf_greedy_ids(model, prompts)


def _greedy(llm, prompts):
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16)
    return [c.token_ids for c in llm.generate_ids(prompts, params)]


@pytest.mark.parametrize(
    "layout", [{}, {"prefill": 1, "decode": 1}, {"prefill": 1, "decode": 1, "kv_transport": "tcp"}]
)
def test_float32_greedy_equals_transformers(model_dir, prompts, reference, layout, device):
    from pdserve import LLM

    llm = LLM(model_dir, device=device, dtype="float32", num_blocks=256, block_size=16, **layout)
    try:
        assert _greedy(llm, prompts) == reference
        assert llm.check_pool_free()
    finally:
        llm.close()


def test_down_projections_as_partial_sums(model_dir, prompts, reference, device, monkeypatch):
    """Every down_proj forced to give split_k.Partials (two slices of K) in float32, which the next
    add-RMSNorm reduces (its Triton kernel on CUDA, Partials.total() on CPU): the same greedy tokens,
    with the decode steps' CUDA graphs captured over them."""
    from pdserve import LLM
    from pdserve.kernels import split_k

    calls: list[int] = []
    monkeypatch.setattr(split_k, "splits_for", lambda x, w, table: calls.append(x.shape[0]) or 2)
    llm = LLM(model_dir, device=device, dtype="float32", num_blocks=256, block_size=16)
    try:
        assert _greedy(llm, prompts) == reference
        assert calls and min(calls) <= len(prompts) < max(calls)  # decode steps' rows and prefills' took them
    finally:
        llm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_decode_steps_with_the_rotary_launch_equal_transformers(model_dir, prompts, eager):
    """decode_rotary=off: decode-only steps keep the rotary + cache-write launch before decode
    attention (the default, triton_new_token, is what every other CUDA test here runs), float32 on
    CUDA: transformers' greedy tokens."""
    from pdserve import LLM
    from pdserve.kernels.config import KernelConfig

    ref = _reference(model_dir, prompts, "cuda")
    kernels = KernelConfig(decode_rotary=False)
    llm = LLM(
        model_dir,
        device="cuda",
        dtype="float32",
        num_blocks=256,
        block_size=16,
        enforce_eager=eager,
        kernels=kernels,
    )
    try:
        assert _greedy(llm, prompts) == ref
        assert llm.check_pool_free()
    finally:
        llm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_runs_clean(model_dir, prompts):
    from pdserve import LLM, SamplingParams

    llm = LLM(model_dir, device="cuda", dtype="bfloat16", num_blocks=256)
    outs = llm.generate_ids(prompts, SamplingParams(temperature=0.8, max_tokens=16, seed=1))
    assert all(len(o.token_ids) >= 1 for o in outs)
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    assert llm.check_pool_free()


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_cuda_default_overlaps_and_launches_ahead(model_dir, prompts, reference, device, eager, monkeypatch):
    """On CUDA, steps are collected after the next is launched, and steady decodes go ahead with the
    previous step's ids on the device (graph input buffer, or eager input ids): same greedy tokens."""
    if device != "cuda":
        pytest.skip("the CUDA default (the CPU case is forced in test_greedy_equivalence)")
    from pdserve import LLM
    from pdserve.engine import engine as engine_module

    calls: list[int] = []
    real = engine_module.schedule_ahead
    monkeypatch.setattr(engine_module, "schedule_ahead", lambda f, s: calls.append(1) or real(f, s))
    llm = LLM(model_dir, device="cuda", dtype="float32", num_blocks=256, enforce_eager=eager)
    try:
        assert llm.engine.overlap
        assert _greedy(llm, prompts) == reference
        assert calls and llm.check_pool_free()
    finally:
        llm.close()


def test_penalized_rows_launch_ahead_on_cuda_and_match_waiting(model_dir, prompts, device, monkeypatch):
    """Penalties and min_tokens bans of a step launched ahead count the previous step's tokens on
    the GPU (engine/penalties.py; the Triton sampler draws after them): the same tokens as an engine
    that waits for every step (CUDA graphs, float32)."""
    if device != "cuda":
        pytest.skip("the CPU case is tests/engine/test_overlap_outputs.py")
    from pdserve import LLM, SamplingParams
    from pdserve.engine import engine as engine_module

    calls: list[int] = []
    real = engine_module.schedule_ahead
    monkeypatch.setattr(engine_module, "schedule_ahead", lambda f, s: calls.append(1) or real(f, s))
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.4, max_tokens=16),
        SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, max_tokens=16),
        SamplingParams(temperature=0.0, min_tokens=8, max_tokens=16),
    ]
    outs = []
    for overlap in (True, False):
        llm = LLM(model_dir, device="cuda", dtype="float32", num_blocks=256, overlap_outputs=overlap)
        try:
            outs.append([[c.token_ids for c in llm.generate_ids(prompts, p)] for p in params])
            assert llm.check_pool_free()
        finally:
            llm.close()
        if overlap:
            assert calls
    assert outs[0] == outs[1]


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_greedy_output_is_the_same_without_programmatic_dependent_launch(
    model_dir, prompts, reference, device, eager
):
    """PDL (kernels/pdl.py: the decode step's Triton kernels launch while the one before drains and
    wait for it on the device) is on by default, so every other CUDA test here runs with it; with
    pdl=off the float32 greedy tokens are transformers' as well (CUDA only)."""
    if device != "cuda":
        pytest.skip("programmatic dependent launch is a CUDA launch attribute")
    from pdserve import LLM
    from pdserve.kernels.config import KernelConfig

    kernels = KernelConfig(pdl=False)
    llm = LLM(model_dir, device="cuda", dtype="float32", num_blocks=256, enforce_eager=eager, kernels=kernels)
    try:
        assert _greedy(llm, prompts) == reference
        assert llm.check_pool_free()
    finally:
        llm.close()

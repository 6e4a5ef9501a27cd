"""Where an fp8 KV pool's per-layer scales come from (engine/kv_scales.py), on the CPU in float32.

A tiny random Qwen2 model (biased K projections, as Qwen2/2.5's) whose first layer's K bias pushes
|K| past e4m3's 448: calibration at load gives the same scales on every load, the checkpoint's
k_scale / v_scale are used where it carries them, the engine's greedy output is the same colocated
and 1P1D (the decode instance reads the prefill's bytes with the same scales), and a pair whose scales
differ is refused at the handshake naming --kv-scales-file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import Engine

from .tiny_models import TEXTS, engine_greedy, handed_off_output, save_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
K_BIAS = 600.0  # layer 0's K bias on a few dimensions: |K| past e4m3's 448


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("qwen2")
    save_tiny_model(str(path), "qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=2)
    weights = load_file(path / "model.safetensors")
    bias = weights["model.layers.0.self_attn.k_proj.bias"]
    bias[:: bias.numel() // 8] += K_BIAS
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(t)[: 6 + 4 * i] for i, t in enumerate(TEXTS[:4])]


def _scales(llm: LLM) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    s = llm.engine.runner.kv_scales
    assert s is not None
    layers = llm.engine.runner.model.model.layers
    held = [(la.self_attn.attn.k_scale, la.self_attn.attn.v_scale) for la in layers]
    assert held == list(zip(s.k, s.v, strict=True))
    return s.k, s.v, s.source


def test_calibration_is_deterministic_and_covers_large_keys(model_dir):
    first, second = (LLM(model_dir, dtype="float32", num_blocks=16, kv_cache_dtype="fp8") for _ in range(2))
    try:
        k, v, source = _scales(first)
        assert (k, v, source) == _scales(second) and source == "calibrated"
        assert 448.0 * k[0] >= K_BIAS and k[0] > k[1]  # layer 0's keys fit e4m3 once scaled
        assert first.engine.runner.kv_scales.digest == second.engine.runner.kv_scales.digest
    finally:
        first.close()
        second.close()


def test_checkpoint_scales_are_used(model_dir, tmp_path):
    dst = tmp_path / "with_scales"
    shutil.copytree(model_dir, dst)
    weights = load_file(dst / "model.safetensors")
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(3.0)
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    weights["model.layers.1.self_attn.kv_scale"] = torch.tensor([0.5])  # one for both, llm-compressor's
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(dst), dtype="float32", num_blocks=16, kv_cache_dtype="fp8")
    try:
        assert _scales(llm) == ((3.0, 0.5), (0.25, 0.5), "checkpoint")
        assert llm.generate_ids([[1, 2, 3]], GREEDY)[0].token_ids  # the scalars are no weights: it loads
    finally:
        llm.close()


def test_fp8_kv_colocated_equals_1p1d(model_dir, prompts):
    """The decode instance reads the prefill's scaled bytes with the same scales; 4-token chunks read
    the chunks before them back from the pool."""
    colocated = engine_greedy(model_dir, prompts, 12, kv_cache_dtype="fp8")
    assert engine_greedy(model_dir, prompts, 12, kv_cache_dtype="fp8", max_num_batched_tokens=4) == colocated
    pair = dict(prefill=1, decode=1, kv_transport="tcp")
    llm = LLM(model_dir, dtype="float32", num_blocks=128, kv_cache_dtype="fp8", **pair)
    try:
        assert [c.token_ids for c in llm.generate_ids(prompts, GREEDY)] == colocated
    finally:
        llm.close()


def test_different_scales_refused_at_handshake(model_dir, tmp_path):
    scales = tmp_path / "ones.json"
    scales.write_text(json.dumps({"k_scale": [1.0, 1.0], "v_scale": [1.0, 1.0]}))

    def engine(role: str, scales_file: str | None) -> Engine:
        cache = CacheConfig(num_blocks=32, kv_cache_dtype="fp8", kv_scales_file=scales_file)
        disagg = DisaggConfig(role=role, kv_transport="inproc")
        return Engine(EngineConfig(model=ModelConfig(path=model_dir), cache=cache, disagg=disagg))

    prefill, decode = engine("prefill", str(scales)), engine("decode", None)
    try:
        assert prefill.runner.kv_scales and prefill.runner.kv_scales.source == "file"
        last = handed_off_output(prefill, decode, [1, 2, 3, 4, 5])
        assert last.finish_reason == "error"
        error = last.error or ""
        assert "fp8 KV cache scales (digest) mismatch" in error and "--kv-scales-file" in error
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


def test_scales_file_is_checked(model_dir, tmp_path):
    bad = tmp_path / "short.json"
    bad.write_text(json.dumps({"k_scale": [1.0], "v_scale": [1.0]}))
    with pytest.raises(ValueError, match="1 scales for a model of 2 layers"):
        LLM(model_dir, dtype="float32", num_blocks=16, kv_cache_dtype="fp8", kv_scales_file=str(bad))

"""`--load-format dummy` and the shipped model shapes (pdserve/model_configs): the configs load, their
KV sizes are the published ones, and a model directory with only a config.json serves with random
weights and the default model's tokenizer, the same tokens for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from pdserve import LLM, SamplingParams
from pdserve.models.llama import head_dim_of
from pdserve.models.prepare import SHAPES_DIR, resolve_model, shipped_shapes

KV_KIB_PER_TOKEN = {
    "qwen2.5-7b": 56,
    "qwen2.5-32b": 256,
    "qwq-32b": 256,
    "qwen2.5-72b": 320,
    "qwen3-8b": 144,
    "qwen3-32b": 256,
}
KV_KIB_PER_TOKEN |= {"llama-3.1-8b": 128}


@pytest.mark.parametrize("name", sorted(KV_KIB_PER_TOKEN))
def test_shipped_shape_resolves_with_its_kv_size(name: str) -> None:
    assert name in shipped_shapes()
    cfg = AutoConfig.from_pretrained(resolve_model(name))
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim_of(cfg) * 2  # bf16
    assert per_token == KV_KIB_PER_TOKEN[name] * 1024


def test_unknown_model_names_the_shapes() -> None:
    with pytest.raises(FileNotFoundError, match="qwen2.5-32b"):
        resolve_model("no-such-model-anywhere")


@pytest.fixture(scope="module")
def tiny_qwen_shape(tmp_path_factory: pytest.TempPathFactory) -> str:
    """qwen2.5-7b's config shrunk to CPU size; the vocabulary (152064) stays bigger than the tokenizer's."""
    cfg = json.loads((SHAPES_DIR / "qwen2.5-7b" / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    cfg.update(num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-qwen2.5")
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def _run(path: str, seed: int, tokenizer) -> list[list[int]]:
    llm = LLM(path, load_format="dummy", seed=seed, num_blocks=64)
    assert llm.tokenizer.encode("Hello there") == tokenizer.encode("Hello there")  # the default model's
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(["Hello there", "A longer prompt about paged attention"], params)
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
    assert any(t >= len(llm.tokenizer) for o in outs for t in o.token_ids)  # beyond the tokenizer: fine
    assert all(isinstance(o.text, str) for o in outs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return [o.token_ids for o in outs]


def test_dummy_weights_serve_without_checkpoint_or_tokenizer(tiny_qwen_shape: str, tokenizer) -> None:
    assert not list(Path(tiny_qwen_shape).glob("*.safetensors"))
    first = _run(tiny_qwen_shape, seed=1, tokenizer=tokenizer)
    assert _run(tiny_qwen_shape, seed=1, tokenizer=tokenizer) == first
    assert _run(tiny_qwen_shape, seed=2, tokenizer=tokenizer) != first


def test_llama3_shape_with_scaled_rope_serves_dummy_weights(tmp_path: Path, tokenizer) -> None:
    """llama-3.1-8b's config (rope_scaling llama3, three eos ids, a 128k vocabulary) shrunk to CPU size."""
    cfg = json.loads((SHAPES_DIR / "llama-3.1-8b" / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    cfg.update(num_key_value_heads=2, max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # one run: that a seed gives the same weights again is the qwen2.5 test's (the same init_dummy)
    _run(str(tmp_path), seed=3, tokenizer=tokenizer)


def test_missing_weights_without_dummy_is_an_error(tiny_qwen_shape: str) -> None:
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(tiny_qwen_shape, num_blocks=16)


def test_tokenizer_directory_without_a_model(tiny_qwen_shape: str, tmp_path: Path, tokenizer) -> None:
    """--tokenizer may name a folder of tokenizer files alone (what the GPU machines get carried): it
    encodes as the default model's tokenizer it was copied from."""
    import shutil

    default = Path(resolve_model(None))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default / name, tmp_path / name)
    llm = LLM(tiny_qwen_shape, load_format="dummy", tokenizer=str(tmp_path), num_blocks=16)
    assert llm.tokenizer.encode("Hello") == tokenizer.encode("Hello")


@pytest.mark.parametrize("name", sorted(KV_KIB_PER_TOKEN))
def test_whole_model_is_built_on_the_build_device(name: str) -> None:
    """Models are built under `with torch.device(...)` (cuda on a GPU): every parameter and buffer must
    land there, even what comes from a CPU-only helper (Llama 3.1's scaled rope frequencies come from
    transformers on the CPU; left there, they break the build on CUDA). 'meta' stands in for cuda: it
    mixes with CPU tensors no better, and builds a 32B shape without memory."""
    import torch

    from pdserve.kernels.config import KernelConfig
    from pdserve.kernels.factory import build_kernels
    from pdserve.models.registry import model_class

    cfg = AutoConfig.from_pretrained(resolve_model(name))
    kernels = build_kernels(KernelConfig(triton=False), torch.device("cpu"))
    with torch.device("meta"):
        model = model_class(cfg)(cfg, kernels, None)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)

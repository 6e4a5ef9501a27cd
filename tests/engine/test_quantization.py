"""--quantization wint8 / wint4 / fp8 and fp8 checkpoints, on the CPU in float32: the engine's greedy
output equals transformers' for the same model whose projections were replaced by their quantized-
then-dequantized weights.

fp8 also rounds every projection's input through e4m3 per token, a step function: inputs that differ
in their last float32 bit (transformers' and our kernels add in other orders) now and then round to
neighbouring e4m3 values, and a free-running greedy sequence may take another branch at a near tie.
So fp8 is checked position by position instead: the reference, run over the engine's own tokens,
gives those tokens nearly the same log-probabilities (most within a few thousandths, a rounding flip
moves one by a few hundredths; without the activations' rounding the reference is 0.06 off) and each
is the reference's argmax or within 0.05 of it.

The quantization the reference applies is written out here from the format's definition (scales by
max |w|, symmetric rounding), independently of pdserve/layers/quant.py. A tiny random Qwen3 model (q/k
norms, head_dim 64) is written by the test. Both roles of a disaggregated pair must agree on the
quantization: a mismatch is refused at the handshake.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import Engine

from .tiny_models import TEXTS, engine_greedy, handed_off_output, hf_greedy_ids, save_tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("qwen3"))
    # intermediate 320 = 2.5 x 128: gate_up's rows and down_proj's inputs end in a part-filled group / block
    arch = dict(architectures=["Qwen3ForCausalLM"], head_dim=64, intermediate_size=320)
    return save_tiny_model(path, "qwen3", **arch)


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.encode(t)[: 5 + 3 * i] for i, t in enumerate(TEXTS[:6])]


# ---- the reference: the formats as defined, applied to transformers' model --------------------------
def fake_wint8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def fake_wint4(w: torch.Tensor) -> torch.Tensor:
    """Groups of 128 inputs (the last one shorter where K is not a multiple of 128)."""
    n, k = w.shape
    groups = torch.nn.functional.pad(w, (0, -k % 128)).view(n, -1, 128)
    scale = groups.abs().amax(dim=2, keepdim=True) / 7
    return ((groups / scale).round().clamp(-7, 7) * scale).view(n, -1)[:, :k]


def fake_fp8(w: torch.Tensor) -> torch.Tensor:
    """Per row (weights per output channel, activations per token): e4m3 with scale max |row| / 448."""
    scale = (w.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=1e-12)
    return (w / scale).clamp(-448, 448).to(E4M3).float() * scale


FAKE = {"wint8": fake_wint8, "wint4": fake_wint4, "fp8": fake_fp8}


def hf_model(
    model_dir: str, weights: Callable[[str, torch.Tensor], torch.Tensor] | None, fp8_inputs: bool
) -> torch.nn.Module:
    """transformers' model (float32) with every projection's weight replaced by weights(name, w) and,
    with fp8_inputs, every projection's input rounded through e4m3 per token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJ:
            if weights is not None:
                module.weight.data = weights(name, module.weight.data)
            if fp8_inputs:
                module.register_forward_pre_hook(lambda _, args: (fake_fp8(args[0]),))
    return model


def hf_greedy(
    model_dir: str,
    prompts: list[list[int]],
    weights: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    fp8_inputs: bool = False,
    device: str = "cpu",
) -> list[list[int]]:
    """transformers' greedy tokens (float32) of hf_model(model_dir, weights, fp8_inputs)."""
    return hf_greedy_ids(hf_model(model_dir, weights, fp8_inputs).to(device), prompts)


# ---- quantized at load -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_weight_only_greedy_equals_the_dequantized_model(model_dir, prompts, method):
    want = hf_greedy(model_dir, prompts, lambda _, w: FAKE[method](w))
    assert engine_greedy(model_dir, prompts, quantization=method) == want
    if method == "wint4":  # the comparison can tell quantized from not: wint4 moves some greedy tokens
        assert want != hf_greedy(model_dir, prompts)


def test_fp8_tokens_score_as_in_the_fp8_reference(model_dir, prompts):
    llm = LLM(model_dir, dtype="float32", num_blocks=128, quantization="fp8")
    try:
        outs = llm.generate_ids(prompts, SamplingParams(temperature=0.0, max_tokens=16, logprobs=0))
    finally:
        llm.close()
    ours = torch.tensor([lp.logprob for c in outs for lp in c.logprobs])
    sequences = [p + c.token_ids for p, c in zip(prompts, outs, strict=True)]
    want, gaps = hf_scores(model_dir, sequences, [len(p) for p in prompts], fp8_inputs=True)
    assert len(ours) == len(want) == 16 * len(prompts)
    off = (ours - want).abs()
    assert off.median() < 1e-2 and off.max() < 0.1  # measured: median 0.002, max 0.05
    assert gaps.max() < 0.05  # every token the reference's greedy choice, or a near tie
    # ... and the comparison can tell: without the activations' rounding the scores are off throughout
    plain, _ = hf_scores(model_dir, sequences, [len(p) for p in prompts], fp8_inputs=False)
    assert (ours - plain).abs().median() > 5 * off.median()  # measured: median 0.06


def hf_scores(
    model_dir: str, sequences: list[list[int]], starts: list[int], fp8_inputs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8-weight reference run once over each whole sequence: for every token after its prompt,
    its log-probability and how far its logit is below the largest."""
    model = hf_model(model_dir, lambda _, w: fake_fp8(w), fp8_inputs)
    scores, gaps = [], []
    with torch.inference_mode():
        for ids, start in zip(sequences, starts, strict=True):
            logits = model(torch.tensor([ids])).logits[0, start - 1 : -1]
            chosen = torch.tensor(ids[start:])[:, None]
            scores.append(logits.log_softmax(-1).gather(1, chosen)[:, 0])
            gaps.append(logits.max(-1).values - logits.gather(1, chosen)[:, 0])
    return torch.cat(scores), torch.cat(gaps)


def test_quantized_disaggregated_pair_equals_colocated(model_dir, prompts):
    colocated = engine_greedy(model_dir, prompts, quantization="wint4")
    assert engine_greedy(model_dir, prompts, quantization="wint4", prefill=1, decode=1) == colocated


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_weight_only_gemm_on_cuda_equals_the_dequantized_model(model_dir, prompts, method):
    """float32 on the GPU: the Triton GEMM that dequantizes in registers (ieee products), CUDA graphs."""
    want = hf_greedy(model_dir, prompts, lambda _, w: FAKE[method](w), device="cuda")
    assert engine_greedy(model_dir, prompts, quantization=method, device="cuda") == want


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "options", [*({"quantization": m} for m in ("wint8", "wint4", "fp8")), {"kv_cache_dtype": "fp8"}]
)
def test_bfloat16_quantized_runs_clean_on_cuda(model_dir, prompts, options):
    llm = LLM(model_dir, device="cuda", dtype="bfloat16", num_blocks=128, **options)
    try:
        outs = llm.generate_ids(prompts, SamplingParams(temperature=0.8, max_tokens=16, seed=1))
        assert all(len(o.token_ids) >= 1 for o in outs) and llm.check_pool_free()
        want = E4M3 if options.get("kv_cache_dtype") == "fp8" else torch.bfloat16
        assert llm.engine.runner.kv_cache.dtype == want
    finally:
        llm.close()


# ---- fp8 checkpoints as the Qwen3 FP8 releases store them -----------------------------------------
def write_fp8_checkpoint(src: str, dst: Path, block: int = 128) -> dict[str, torch.Tensor]:
    """`src` with every projection stored as e4m3 and 128 x 128 block scales (`weight_scale_inv`);
    returns the dequantized weights it stands for, by checkpoint name."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    dequantized = {}
    for name in [n for n in tensors if n.rsplit(".", 2)[-2] in PROJ]:
        w = tensors[name]
        n, k = w.shape
        blocks = torch.nn.functional.pad(w, (0, -k % block, 0, -n % block))
        blocks = blocks.view(blocks.shape[0] // block, block, blocks.shape[1] // block, block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448  # [ceil(n/128), ceil(k/128)]
        full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
        tensors[name] = (w / full).to(E4M3)
        tensors[name + "_scale_inv"] = scale
        dequantized[name] = tensors[name].float() * full
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def test_fp8_block_checkpoint_loads_as_its_dequantized_weights(model_dir, prompts, tmp_path):
    dst = tmp_path / "fp8"
    dequantized = write_fp8_checkpoint(model_dir, dst)
    assert any(w.shape[0] % 128 for w in dequantized.values())  # gate/up: a part-filled row of blocks
    want = hf_greedy(model_dir, prompts, lambda name, _: dequantized[name + ".weight"])
    assert engine_greedy(str(dst), prompts) == want


# ---- a disaggregated pair must agree --------------------------------------------------------------
def _engine(model_dir: str, role: str, quantization: str | None, kv_cache_dtype: str = "auto") -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(path=model_dir, quantization=quantization),
            cache=CacheConfig(num_blocks=64, kv_cache_dtype=kv_cache_dtype),
            disagg=DisaggConfig(role=role, kv_transport="inproc"),
        )
    )


KV_MISMATCH = "KV cache dtype mismatch: decode runs torch.float32, prefill runs torch.float8_e4m3fn"


@pytest.mark.parametrize(
    ("prefill_options", "decode_options", "message"),
    [
        (("wint8",), (None,), "weight quantization mismatch: decode runs none, prefill runs wint8"),
        ((None, "fp8"), (None,), KV_MISMATCH),
    ],
    ids=["quantization", "kv-cache-dtype"],
)
def test_mismatch_refused_at_handshake(model_dir, prefill_options, decode_options, message):
    prefill = _engine(model_dir, "prefill", *prefill_options)
    decode = _engine(model_dir, "decode", *decode_options)
    try:
        last = handed_off_output(prefill, decode, [1, 2, 3, 4, 5])
        assert last.finish_reason == "error"
        assert message in (last.error or "") and "both roles need the same --" in (last.error or "")
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


@pytest.mark.slow  # a worker process: 6-12 s on 2 cores; not needed for the formats' proof above
def test_tensor_parallel_ranks_hold_the_tp1_quantized_model(model_dir, prompts):
    """TP 2: each rank quantizes its shard; row-parallel rows are scaled by the full row's max |w|
    (gathered over the ranks), so the ranks together run the tp=1 wint8 model."""
    want = hf_greedy(model_dir, prompts, lambda _, w: fake_wint8(w))
    assert engine_greedy(model_dir, prompts, quantization="wint8", tensor_parallel_size=2) == want


# ---- --kv-cache-dtype fp8 -------------------------------------------------------------------------
def test_fp8_kv_cache_moves_its_bytes_unchanged(model_dir, prompts):
    """An e4m3 pool: the same greedy tokens colocated, with 4-token prefill chunks (each chunk reads
    the ones before from the pool) and 1P1D over tcp, whose hand-off moves a quarter of float32's bytes."""
    colocated = engine_greedy(model_dir, prompts, kv_cache_dtype="fp8")
    assert engine_greedy(model_dir, prompts, kv_cache_dtype="fp8", max_num_batched_tokens=4) == colocated
    moved = {}
    for kv in ("fp8", "auto"):
        pair = dict(prefill=1, decode=1, kv_transport="tcp")
        llm = LLM(model_dir, dtype="float32", num_blocks=128, kv_cache_dtype=kv, **pair)
        try:
            assert llm.engine.runner.kv_cache.dtype == (E4M3 if kv == "fp8" else torch.float32)
            out = [c.token_ids for c in llm.generate_ids(prompts, GREEDY)]
            assert out == colocated or kv == "auto"
            assert llm.engine.connector is not None
            moved[kv] = llm.engine.connector.bytes_received
        finally:
            llm.close()
    assert moved["fp8"] * 4 == moved["auto"] > 0


# ---- quantized while loading ----------------------------------------------------------------------
def _float_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of float projection weights, bytes of all float parameters) the model holds now; the
    meta placeholders of projections not yet loaded and the quantized weights' data and scales not
    counted."""
    from pdserve.layers.linear import QuantizableLinear
    from pdserve.layers.quant import QuantizedWeight

    proj = total = 0
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            continue
        for p in module.parameters(recurse=False):
            if p.is_meta or not p.is_floating_point():
                continue
            size = p.numel() * p.element_size()
            total += size
            proj += size if isinstance(module, QuantizableLinear) else 0
    return proj, total


def test_wint4_load_holds_one_module_in_float_at_a_time(model_dir):
    """The projections are quantized as they load: the float projection weights held at any moment
    (watched after every checkpoint tensor) are at most one layer's, never the model's; the quantized
    weights are those of quantizing the full-precision model after loading."""
    from transformers import AutoConfig

    from pdserve.kernels.config import KernelConfig
    from pdserve.kernels.factory import build_kernels
    from pdserve.layers.linear import QuantizableLinear
    from pdserve.layers.quant import quantize
    from pdserve.models.loader import build_model

    cfg = AutoConfig.from_pretrained(model_dir)
    kernels = build_kernels(KernelConfig(), torch.device("cpu"))
    cpu, f32 = torch.device("cpu"), torch.float32
    full = build_model(cfg, model_dir, kernels, f32, cpu)
    full_proj, full_total = _float_bytes(full)
    layer_proj = _float_bytes(full.model.layers[0])[0]
    assert full_proj == cfg.num_hidden_layers * layer_proj
    seen: list[tuple[int, int]] = []
    model = build_model(
        cfg,
        model_dir,
        kernels,
        f32,
        cpu,
        quantization="wint4",
        on_tensor=lambda m: seen.append(_float_bytes(m)),
    )
    assert len(seen) > 4 * cfg.num_hidden_layers  # watched after every tensor
    peak_proj, peak_total = max(p for p, _ in seen), max(t for _, t in seen)
    assert 0 < peak_proj <= layer_proj  # measured: one gate_up (q, k, v, o and down are smaller)
    assert peak_total <= full_total - full_proj + layer_proj
    assert _float_bytes(model)[0] == 0
    quantized = dict(model.named_modules())
    for name, module in full.named_modules():
        if isinstance(module, QuantizableLinear):
            want, got = quantize(module.weight, "wint4"), quantized[name].qweight
            assert got is not None and torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)

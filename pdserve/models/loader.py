"""Build a model from a local HF directory: safetensors weights by name, or random (`dummy`) weights.

With tensor parallelism each rank builds its shard and keeps its slice of every full tensor it reads or
draws (pdserve.distributed.weights), so all ranks together hold exactly the tp=1 model. With
`--quantization` the projections and experts are built without memory and each is quantized as soon
as it is filled (models/load_quantize.py): a model that fits only quantized loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from pdserve.distributed.group import TPGroup
from pdserve.distributed.weights import copy_full_rows, shard_of
from pdserve.kernels.ops import Kernels
from pdserve.layers.quant import check_method, deferred_weights
from pdserve.models.fp8_checkpoint import read_tensors
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.load_quantize import LiveParams, QuantizeOnFill
from pdserve.models.registry import model_class


def build_model(
    hf_config: Any,
    model_dir: str,
    kernels: Kernels,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    seed: int = 0,
    tp: TPGroup | None = None,
    quantization: str | None = None,
    on_tensor: Callable[[torch.nn.Module], None] | None = None,
) -> LlamaForCausalLM:
    """`on_tensor`, if given, is called after each checkpoint tensor is in place (before quantizing
    the module it completed): a progress hook, and how tests watch the memory the load holds."""
    cls = model_class(hf_config)
    deferred: AbstractContextManager[object] = nullcontext()
    if quantization is not None:
        check_method(quantization)
        deferred = deferred_weights()  # the float projections allocated only as they are filled
    with torch.device(device), _default_dtype(dtype), deferred:  # a 32B model never exists in fp32
        model = cls(hf_config, kernels, tp)
    if load_format == "dummy":
        init_dummy(model, seed, quantization)
    else:
        load_safetensors(model, model_dir, quantization, on_tensor)
    if quantization is not None and device.type == "cuda":
        torch.cuda.empty_cache()  # the float weights just freed: the KV pool is sized after this
    # rotary tables stay float32; they are cast per use
    return model.eval().requires_grad_(False)


def load_safetensors(
    model: LlamaForCausalLM,
    model_dir: str,
    quantization: str | None = None,
    on_tensor: Callable[[torch.nn.Module], None] | None = None,
) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    params = LiveParams(model)
    expected = _expected_fills(model, params)
    quantizer = None if quantization is None else QuantizeOnFill(model, quantization, expected)
    filled: set[str] = set()
    for name, tensor in read_tensors(files, model.config):  # fp8 checkpoints dequantized (fp8_checkpoint.py)
        fills = model.load_weight(name, tensor, params)
        filled.update(fills)
        if on_tensor is not None:
            on_tensor(model)
        if quantizer is not None:
            quantizer.filled(fills)
    missing = sorted(expected - filled)
    if missing:
        raise ValueError(
            f"weights missing from {model_dir}: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if quantizer is not None:
        quantizer.check_done()


def _expected_fills(model: LlamaForCausalLM, params: dict[str, torch.nn.Parameter]) -> set[str]:
    """Names `load_weight` must have returned: parameters, or for stacked ones each stacked part
    (a MergedLinear's shards; a FusedExperts' gate, up and down of every expert)."""
    from pdserve.layers.linear import MergedLinear
    from pdserve.layers.moe import FusedExperts

    expected = set(params)
    for mod_name, module in model.named_modules():
        if isinstance(module, MergedLinear):
            for p in ("weight", "bias"):
                if getattr(module, p) is not None:
                    expected.discard(f"{mod_name}.{p}")
                    expected.update(f"{mod_name}.{p}:{s}" for s in module.shards)
        elif isinstance(module, FusedExperts):
            expected -= {f"{mod_name}.gate_up_proj", f"{mod_name}.down_proj"}
            expected.update(f"{mod_name}.{fill}" for fill in module.fill_names())
    if model.tie_word_embeddings:
        expected.discard("lm_head.weight")
    return expected


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def init_dummy(model: LlamaForCausalLM, seed: int, quantization: str | None = None) -> None:
    """Random weights of a sane scale, so that large shapes can be timed without a checkpoint.

    Drawn on the parameters' device (seconds for 32B on a GPU), in float32 then cast, one tensor at a
    time; the same seed gives the same weights on the same device type. Every tensor-parallel rank draws
    the full tensors in the same order and keeps its slice: the ranks hold the tp=1 model. With
    `quantization` each module is quantized once its parameters are drawn.
    """
    params = LiveParams(model)
    device = model.model.norm.weight.device  # never deferred
    quantizer = None if quantization is None else QuantizeOnFill(model, quantization, params)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name in list(params):
            p = params[name]  # allocated here if it was deferred
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                _draw(p, gen, device)
            if quantizer is not None:
                quantizer.filled([name])
    if quantizer is not None:
        quantizer.check_done()


def _draw(p: torch.Tensor, gen: torch.Generator, device: torch.device) -> None:
    shard = shard_of(p)
    for first in range(0, shard.full_rows, 4096):  # bounded float32 temporaries
        n = min(4096, shard.full_rows - first)
        rows = torch.randn((n, shard.full_cols), generator=gen, device=device) * 0.02
        copy_full_rows(p, rows, first)

"""Checkpoints stored in fp8 the way the Qwen3 FP8 (and DeepSeek-V3) releases store them: each quantized
projection's `weight` in float8_e4m3fn and beside it `weight_scale_inv`, one float32 scale per block
of 128 x 128 weights (w = fp8 value * scale, despite the name), announced in config.json by

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

Layers the release left unquantized (embeddings, norms, lm_head) are ordinary tensors. `read_tensors`
gives the checkpoint's tensors by name with every fp8 weight dequantized (float32), so the model
loads exactly the weights the release stands for; `--quantization fp8` then requantizes them per
output channel like any other model. This module knows nothing of the model's parameter names.

Checkpoints made for an fp8 KV cache (vLLM's, llm-compressor's) also carry a scalar per attention
layer, `model.layers.N.self_attn.k_scale` and `.v_scale` (or one `.kv_scale` for both; older AutoFP8
ones `.k_proj.output_scale`, `.v_proj.output_scale`). They are no weights: `read_tensors` leaves them
out and `kv_cache_scales` reads them (engine/kv_scales.py decides whether they are used).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`
# a KV-cache scale's name: its layer, and k, v or kv in one of the two groups
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)")


def weight_block_size(hf_config: Any) -> tuple[int, int] | None:
    """The [rows, cols] of the checkpoint's fp8 scale blocks, or None for an unquantized checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method, block = qc.get("quant_method"), qc.get("weight_block_size")
    if method != "fp8" or block is None or len(block) != 2:
        raise ValueError(
            f"quantization_config {qc}: pdserve loads fp8 checkpoints with block-wise scales "
            '({"quant_method": "fp8", "weight_block_size": [128, 128]}) or unquantized ones'
        )
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"quantization_config {qc}: only dynamic activation scales are supported")
    return int(block[0]), int(block[1])


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 [N, K] * scale [ceil(N/bn), ceil(K/bk)] broadcast over its blocks -> float32 [N, K]."""
    n, k = weight.shape
    if scale.shape != (-(-n // block[0]), -(-k // block[1])):
        raise ValueError(f"fp8 weight {tuple(weight.shape)}: block scales {tuple(scale.shape)} do not fit")
    full = scale.float().repeat_interleave(block[0], dim=0)[:n].repeat_interleave(block[1], dim=1)[:, :k]
    return weight.float() * full


def read_tensors(files: list[Path], hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the safetensors `files` by name; fp8 weights dequantized by their block scales
    (which may sit in another file), the scales themselves not given."""
    block = weight_block_size(hf_config)
    where = {name: file for file in files for name in _names(file)}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if (block is not None and name.endswith(SCALE_SUFFIX)) or kv_scale_name(name) is not None:
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.float8_e4m3fn:
                    if block is None or name + SCALE_SUFFIX not in where:
                        raise ValueError(f"{name} is fp8 without a {name}{SCALE_SUFFIX} block scale")
                    scale = _tensor(where[name + SCALE_SUFFIX], name + SCALE_SUFFIX)
                    tensor = dequantize_blocks(tensor, scale, block)
                yield name, tensor


def _names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _tensor(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def kv_scale_name(name: str) -> tuple[int, str] | None:
    """(layer, "k" | "v" | "kv") for a KV-cache scale's checkpoint name, else None."""
    m = _KV_SCALE.fullmatch(name)
    return None if m is None else (int(m.group(1)), m.group(2) or m.group(3))


def kv_cache_scales(files: list[Path]) -> dict[tuple[int, str], float]:
    """The checkpoint's KV-cache scales: (layer, "k" | "v" | "kv") -> the scalar (empty: it has none)."""
    found: dict[tuple[int, str], float] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                key = kv_scale_name(name)
                if key is None:
                    continue
                tensor = f.get_tensor(name)
                if tensor.numel() != 1:
                    raise ValueError(
                        f"{name}: a KV-cache scale must be one number, got shape {tuple(tensor.shape)}"
                    )
                found[key] = float(tensor.float().item())
    return found

"""The per-layer scales of an fp8 KV cache (--kv-cache-dtype fp8): where they come from, and into the
attention layers.

Each attention layer's pool holds K / k_scale and V / v_scale in e4m3 (largest finite value 448), and
attention multiplies them back (layers/attention/backend.py). With scale 1, Qwen2's biased K
projections (|K| in the hundreds) saturate, and small V values sink into e4m3's subnormals. The
scales come from, the first that applies:

    1. --kv-scales-file PATH   JSON {"k_scale": [one a layer], "v_scale": [...]}
    2. the checkpoint          vLLM's / llm-compressor's scalars (models/fp8_checkpoint.py)
    3. calibration             a fixed text through the model at load (engine/kv_calibration.py)

They are fixed once the model is loaded, before the pool is used or a decode step captured in a CUDA
graph. Both roles of a disaggregated pair must hold the same ones: `digest` goes into the KV layout
the handshake compares (disagg/compat.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdserve.config import CacheConfig, ModelConfig
from pdserve.distributed.group import TPGroup
from pdserve.engine.kv_calibration import calibration_ids, kv_amax, model_max_len
from pdserve.models.fp8_checkpoint import kv_cache_scales

logger = logging.getLogger(__name__)

E4M3_MAX = 448.0
# Calibration sees a few hundred tokens; other text, and positions past the text's (rotary turns a
# pair of K dimensions, moving up to sqrt(2) of its largest component onto one), reach larger values.
# Headroom is nearly free in a float format: e4m3 keeps 3 mantissa bits at every magnitude, so a 2x
# larger scale costs precision only where values fall below its smallest normal (2^-6 of the scale).
HEADROOM = 2.0


@dataclass(frozen=True)
class KVScales:
    """k_scale and v_scale of every layer (the pool holds K / k_scale, V / v_scale), and where from."""

    k: tuple[float, ...]
    v: tuple[float, ...]
    source: str  # "file", "checkpoint", "calibrated"

    def __post_init__(self) -> None:
        if len(self.k) != len(self.v):
            raise ValueError(f"{len(self.k)} k scales for {len(self.v)} v scales")
        bad = [s for s in (*self.k, *self.v) if not (math.isfinite(s) and s > 0.0)]
        if bad:
            raise ValueError(f"KV cache scales must be positive and finite, got {bad[:4]}")

    @property
    def digest(self) -> str:
        """16 hex digits that differ where any scale differs (the handshake's comparison)."""
        text = json.dumps(self.to_json(), sort_keys=True)  # repr of each float: exact
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, list[float]]:
        """What --kv-scales-file reads."""
        return {"k_scale": list(self.k), "v_scale": list(self.v)}

    def apply(self, model: torch.nn.Module) -> None:
        """Hand each layer's attention backend its scales."""
        layers: Any = model.model.layers  # type: ignore[union-attr]
        if len(layers) != len(self.k):
            raise ValueError(f"{len(self.k)} KV cache scales for a model of {len(layers)} layers")
        for layer, k, v in zip(layers, self.k, self.v, strict=True):
            layer.self_attn.attn.set_kv_scales(k, v)


def scale_for(amax: float) -> float:
    """A power of two at least HEADROOM * amax / 448: K / scale then fits e4m3 with that headroom.

    A power of two, not amax / 448 itself: dividing by it is exact (only the e4m3 rounding remains),
    and two instances whose calibration maxima differ in their last bits (another GPU, another
    tensor-parallel split) still get the same scale, so their KV stays exchangeable. A float format
    loses nothing by the coarser scale but the one bit of headroom it may add (HEADROOM says why)."""
    if amax <= 0.0:
        return 1.0  # a layer that writes only zeros
    if not math.isfinite(amax):
        raise ValueError(f"fp8 KV calibration: the model wrote a non-finite K/V value ({amax})")
    return float(2.0 ** math.ceil(math.log2(amax * HEADROOM / E4M3_MAX)))


def read_file(path: str, num_layers: int) -> KVScales:
    """--kv-scales-file: {"k_scale": [...], "v_scale": [...]}, one number a layer."""
    try:
        data = json.loads(Path(path).read_text())
        k, v = data["k_scale"], data["v_scale"]
        scales = KVScales(tuple(float(x) for x in k), tuple(float(x) for x in v), "file")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'--kv-scales-file {path}: want {{"k_scale": [...], "v_scale": [...]}} ({e})') from e
    if len(scales.k) != num_layers:
        raise ValueError(
            f"--kv-scales-file {path}: {len(scales.k)} scales for a model of {num_layers} layers"
        )
    return scales


def from_checkpoint(model_dir: str, num_layers: int) -> KVScales | None:
    """The checkpoint's k_scale / v_scale (or kv_scale) of every layer; None where it has none."""
    path = Path(model_dir)
    found = kv_cache_scales(sorted(path.glob("*.safetensors"))) if path.is_dir() else {}
    if not found:
        return None
    k, v = [], []
    for layer in range(num_layers):
        both = found.get((layer, "kv"))
        ks, vs = found.get((layer, "k"), both), found.get((layer, "v"), both)
        if ks is None or vs is None:
            raise ValueError(f"{model_dir}: layer {layer} has no k_scale / v_scale while others do")
        k.append(ks)
        v.append(vs)
    return KVScales(tuple(k), tuple(v), "checkpoint")


def calibrate(
    model: torch.nn.Module,
    hf_config: Any,
    model_config: ModelConfig,
    pool_shape: tuple[int, int, int],  # (num_layers, this rank's kv heads, head_dim)
    dtype: torch.dtype,
    tp: TPGroup,
) -> KVScales:
    """Scales from the maxima the calibration text makes each layer write (engine/kv_calibration.py)."""
    from pdserve.models.prepare import tokenizer_path

    try:
        tokenizer_dir: str | None = tokenizer_path(model_config)
    except (OSError, ValueError) as e:
        logger.warning("fp8 KV calibration: no tokenizer (%s)", e)
        tokenizer_dir = None
    max_len = model_max_len(hf_config, model_config.max_model_len)
    ids = calibration_ids(tokenizer_dir, int(hf_config.vocab_size), max_len)
    amax = kv_amax(model, ids, pool_shape, dtype, tp)  # [layers, 2]
    k = tuple(scale_for(float(a)) for a in amax[:, 0])
    v = tuple(scale_for(float(a)) for a in amax[:, 1])
    return KVScales(k, v, "calibrated")


def resolve(
    model: torch.nn.Module,
    hf_config: Any,
    model_config: ModelConfig,
    cache_config: CacheConfig,
    pool_shape: tuple[int, int, int],
    dtype: torch.dtype,
    tp: TPGroup,
) -> KVScales | None:
    """The fp8 pool's scales, handed to the model's layers; None (scales 1) for a pool of the model's
    dtype."""
    if cache_config.kv_cache_dtype != "fp8":
        if cache_config.kv_scales_file:
            raise ValueError("--kv-scales-file is for --kv-cache-dtype fp8")
        return None
    num_layers = pool_shape[0]
    if cache_config.kv_scales_file:
        scales = read_file(cache_config.kv_scales_file, num_layers)
    else:
        found = from_checkpoint(model_config.path, num_layers)
        scales = found or calibrate(model, hf_config, model_config, pool_shape, dtype, tp)
    scales.apply(model)
    logger.info(
        "fp8 KV cache scales (%s, digest %s): k %g..%g, v %g..%g",
        scales.source, scales.digest, min(scales.k), max(scales.k), min(scales.v), max(scales.v),
    )  # fmt: skip
    return scales

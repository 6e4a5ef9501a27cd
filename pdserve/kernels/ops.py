"""Kernels: the model's operations, each bound to the implementation chosen for one model runner.

Built once by factory.build_kernels from a KernelConfig and handed to the layers when the model is
built; a layer calls `kernels.rms_norm(...)` and never asks which implementation that is. No triton
here: this module only names the operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.kernels import activation, fp8
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.split_k import Partials

Tensor = torch.Tensor


@dataclass(frozen=True)
class AttentionKernels:
    """The Triton attention backend's launches, bound to the config's PDL and tuning."""

    store_kv: Callable[..., None]  # k, v, kv_cache, slot_mapping, k_scale, v_scale
    rotary_store_kv: Callable[..., None]  # triton_rotary.rotary_store_kv
    paged_decode: Callable[..., None]  # attention/triton_decode.paged_decode
    paged_prefill: Callable[..., None]  # attention/triton_prefill.paged_prefill
    num_splits: Callable[[int, int, int, torch.device], int]  # batch, kv heads, max length, device
    decode_rotary: bool  # decode-only steps: rotary + KV write inside the decode kernel


@dataclass(frozen=True)
class Kernels:
    """One implementation per operation; `config` is the resolved KernelConfig they were chosen by."""

    config: KernelConfig
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]  # x, weight, eps
    add_rms_norm: Callable[[Tensor | Partials, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor]  # x, weight, bias
    silu_mul_linear: Callable[[Tensor, Tensor], Tensor]  # x, gate_up weight
    split_products: Callable[[Tensor, Tensor], Partials | None]  # x, down weight: Partials or None
    # positions, q, k, cos table, sin table -> q, k rotated in place; None: the torch rotation
    rotary: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None
    attention: AttentionKernels | None  # None: the torch attention backend
    silu_and_mul: Callable[[Tensor], Tensor] = activation.silu_and_mul  # gate_up's product -> [.., I]
    # --quantization (layers/quant.py): x, e4m3 weight, its row scales, bias
    fp8_linear: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor] = fp8.emulated_linear
    # x, int8 / packed int4 weight, its scales, bias; None: dequantize then F.linear (layers/quant.py)
    wint_linear: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor] | None = None

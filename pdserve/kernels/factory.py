"""build_kernels: the one place that turns a KernelConfig into the model's operations (ops.Kernels).

The torch implementations are always there; the Triton modules are imported here only when the
config chooses Triton (CUDA with triton installed, or a test under TRITON_INTERPRET), so a CPU process
never imports triton. Tuning tables come from the device family's file (tuning/tables.py).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import replace

import torch

from pdserve.kernels import fp8, linear, norm, split_k
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.ops import AttentionKernels, Kernels
from pdserve.kernels.pdl import Pdl
from pdserve.kernels.tuning.tables import Tuning, tuning_for


def build_kernels(config: KernelConfig, device: torch.device) -> Kernels:
    """The operations `config` chooses for a model on `device`."""
    config = config.resolved(device.type)
    tuning = tuning_for(config.tuning, device)
    pdl = Pdl(config.pdl, tuning.pdl_max_rows, tuning.pdl_attention_max_rows)
    kernels = Kernels(
        config=config,
        rms_norm=norm.rms_norm,
        add_rms_norm=norm.add_rms_norm,
        linear=linear.linear,
        silu_mul_linear=linear.silu_mul_linear,
        split_products=_split_products(config, tuning),
        rotary=None,
        attention=_attention(config, tuning, pdl) if uses_triton_attention(config) else None,
        fp8_linear=fp8.scaled_mm_linear if fp8.has_fp8_mm(device) else fp8.emulated_linear,
    )
    return _with_triton(kernels, tuning, pdl) if config.triton else kernels


def uses_triton_attention(config: KernelConfig) -> bool:
    """Whether `config` (resolved) takes the Triton attention backend; "triton" needs the package."""
    if config.attention == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError("attention=triton but the triton package is not installed")
    return config.attention == "triton" or (config.attention == "auto" and bool(config.triton))


def _split_products(config: KernelConfig, tuning: Tuning) -> functools.partial[split_k.Partials | None]:
    table = tuning.split_k if config.split_norm else {}
    return functools.partial(split_k.split_products, table=table)


def _with_triton(kernels: Kernels, tuning: Tuning, pdl: Pdl) -> Kernels:
    """`kernels` with the Triton implementations of the dense operations."""
    from pdserve.kernels import triton_fp8, triton_fused, triton_rotary, triton_wquant_choice
    from pdserve.kernels.triton_linear import Projections

    config = kernels.config
    projections = Projections(tuning.skinny if config.skinny_gemm else None, config.gated_rows, pdl)
    return replace(
        kernels,
        rms_norm=functools.partial(triton_fused.rms_norm, pdl=pdl),
        add_rms_norm=functools.partial(triton_fused.add_rms_norm, pdl=pdl),
        linear=projections.linear,
        silu_mul_linear=projections.silu_mul_linear,
        silu_and_mul=functools.partial(triton_fused.silu_and_mul, pdl=pdl),
        rotary=triton_rotary.triton_rotary,
        wint_linear=triton_wquant_choice.wint_linear,
        fp8_linear=_fp8_linear(kernels, triton_fp8.quantize_rows),
    )


def _fp8_linear(kernels: Kernels, quantizer: fp8.Quantizer) -> Callable[..., torch.Tensor]:
    """Where the fp8 tensor cores run: the weight-only skinny kernel at decode rows, else
    torch._scaled_mm with the Triton activation quantizer; elsewhere the product already chosen."""
    from pdserve.kernels.triton_wquant_choice import Fp8Linear

    if kernels.fp8_linear is not fp8.scaled_mm_linear:
        return kernels.fp8_linear
    return Fp8Linear(functools.partial(fp8.scaled_mm_linear, quantize=quantizer), skinny=True)


def _attention(config: KernelConfig, tuning: Tuning, pdl: Pdl) -> AttentionKernels:
    from pdserve.kernels.attention import triton_decode
    from pdserve.kernels.attention.triton_cache import store_kv
    from pdserve.kernels.attention.triton_prefill import paged_prefill
    from pdserve.kernels.triton_rotary import rotary_store_kv

    return AttentionKernels(
        store_kv=store_kv,
        rotary_store_kv=functools.partial(rotary_store_kv, pdl=pdl),
        paged_decode=functools.partial(triton_decode.paged_decode, tiles=tuning.attention, pdl=pdl),
        paged_prefill=functools.partial(paged_prefill, tiles=tuning.attention),
        num_splits=functools.partial(
            triton_decode.choose_num_splits,
            max_splits=tuning.decode_max_splits,
            min_tokens=tuning.decode_min_split_tokens,
        ),
        decode_rotary=config.decode_rotary,
    )

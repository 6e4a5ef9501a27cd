"""Qwen3-MoE: Qwen3's attention (q/k RMSNorm, no qkv bias) with routed experts in place of the MLP.

A layer is sparse unless it is in `mlp_only_layers` or off the `decoder_sparse_step` grid (as in
transformers); routing is softmax, top-k, renormalised when `norm_topk_prob`. No shared expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pdserve.distributed.group import TPGroup
from pdserve.kernels.ops import Kernels
from pdserve.layers.moe import MoeShape, Routing, SparseMoeBlock, load_expert_weight
from pdserve.models.qwen3 import Qwen3ForCausalLM


def qwen_sparse(cfg: Any, layer: int) -> bool:
    """transformers' Qwen2/3-MoE rule for which layers hold experts."""
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    only_mlp = getattr(cfg, "mlp_only_layers", None) or []
    return layer not in only_mlp and cfg.num_experts > 0 and (layer + 1) % step == 0


def qwen_routing(cfg: Any) -> Routing:
    return Routing(top_k=cfg.num_experts_per_tok, normalize=bool(getattr(cfg, "norm_topk_prob", False)))


class MoeWeights:
    """Mixin for MoE models: routed experts' checkpoint tensors go to their FusedExperts first."""

    def load_weight(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> list[str]:
        filled = load_expert_weight(self, name, tensor)  # type: ignore[arg-type]
        return filled if filled is not None else super().load_weight(name, tensor, params)  # type: ignore[misc]


class Qwen3MoeForCausalLM(MoeWeights, Qwen3ForCausalLM):
    def build_mlp(self, cfg: Any, layer: int, tp: TPGroup, kernels: Kernels) -> nn.Module:
        if not qwen_sparse(cfg, layer):
            return super().build_mlp(cfg, layer, tp, kernels)
        shape = MoeShape(cfg.num_experts, cfg.moe_intermediate_size, qwen_routing(cfg))
        return SparseMoeBlock(cfg.hidden_size, shape, tp, kernels)

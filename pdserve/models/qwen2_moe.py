"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (qkv bias from `qkv_bias`) with routed
experts plus one shared expert whose output is scaled by sigmoid(x @ shared_expert_gate^T)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pdserve.distributed.group import TPGroup
from pdserve.kernels.ops import Kernels
from pdserve.layers.moe import MoeShape, SparseMoeBlock
from pdserve.models.qwen2 import Qwen2ForCausalLM
from pdserve.models.qwen3_moe import MoeWeights, qwen_routing, qwen_sparse


class Qwen2MoeForCausalLM(MoeWeights, Qwen2ForCausalLM):
    def qkv_bias(self, cfg: Any) -> bool:
        return bool(getattr(cfg, "qkv_bias", True))

    def build_mlp(self, cfg: Any, layer: int, tp: TPGroup, kernels: Kernels) -> nn.Module:
        if not qwen_sparse(cfg, layer):
            return super().build_mlp(cfg, layer, tp, kernels)
        shared = int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
        shape = MoeShape(
            cfg.num_experts, cfg.moe_intermediate_size, qwen_routing(cfg), shared, shared_gate=shared > 0
        )
        return SparseMoeBlock(cfg.hidden_size, shape, tp, kernels)

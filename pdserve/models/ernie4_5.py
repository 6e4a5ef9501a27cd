"""ERNIE-4.5: dense (`Ernie4_5ForCausalLM`, e.g. 0.3B) and MoE (`Ernie4_5_MoeForCausalLM`, 21B-A3B,
300B-A47B) on the Llama decoder.

Differences from Llama, all handled at load time or in the MoE block:
- rotary pairs are interleaved (dims 2i, 2i+1 share frequency i; transformers' GLM-style rotate_half)
  where Llama pairs i with i + d/2. Attention scores only see q.k, so permuting each head's q and k rows
  to [even dims, odd dims] when loading makes the rotate-half kernels compute exactly ERNIE's attention;
- MoE layers are those with (i + 1) % moe_layer_interval == 0 between moe_layer_start_index and
  moe_layer_end_index; the others are dense MLPs of `intermediate_size`;
- the router runs in float32: softmax, top-k over softmax + e_score_correction_bias (present when the
  config does not set moe_use_aux_free false), weights from the unbiased softmax renormalised with the
  sum clamped to moe_norm_min; `moe_num_shared_experts` shared experts form one MLP of that many times
  moe_intermediate_size, added unscaled;
- multi-token-prediction (mtp) tensors in the checkpoint are skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pdserve.distributed.group import TPGroup
from pdserve.kernels.ops import Kernels
from pdserve.layers.moe import MoeShape, Routing, SparseMoeBlock
from pdserve.models.llama import LlamaForCausalLM, head_dim_of
from pdserve.models.qwen3_moe import MoeWeights

RENAMES = {  # checkpoint fragment -> ours
    ".mlp.gate.moe_statics.": ".mlp.gate.",  # transformers' in-memory name
    ".mlp.moe_statics.": ".mlp.gate.",  # checkpoints'
    ".mlp.shared_experts.": ".mlp.shared_expert.",
}


def deinterleave_heads(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k projection rows [heads * d, ...] with each head's dims reordered 0, 2, 4, ..., 1, 3, 5, ..."""
    shape = tensor.shape
    per_head = tensor.reshape(shape[0] // head_dim, head_dim // 2, 2, *shape[1:])
    return per_head.transpose(1, 2).reshape(shape)


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: Any, kernels: Kernels, tp: TPGroup | None = None) -> None:
        if getattr(cfg, "use_bias", False):
            raise ValueError("ERNIE-4.5 with use_bias=true (biases on every projection) is not supported")
        super().__init__(cfg, kernels, tp)

    def qkv_bias(self, cfg: Any) -> bool:
        return False

    def load_weight(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> list[str]:
        if ".mtp" in name or "mtp_" in name:
            return []
        for frag, ours in RENAMES.items():
            name = name.replace(frag, ours)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            tensor = deinterleave_heads(tensor, head_dim_of(self.config))
        return super().load_weight(name, tensor, params)


def ernie_sparse(cfg: Any, layer: int) -> bool:
    """transformers' rule for which ERNIE-4.5 layers hold experts."""
    end = cfg.moe_layer_end_index
    end = cfg.num_hidden_layers - 1 if end is None or end < 0 else end
    return (layer + 1) % cfg.moe_layer_interval == 0 and cfg.moe_layer_start_index <= layer <= end


class Ernie4_5_MoeForCausalLM(MoeWeights, Ernie4_5ForCausalLM):
    def build_mlp(self, cfg: Any, layer: int, tp: TPGroup, kernels: Kernels) -> nn.Module:
        if not ernie_sparse(cfg, layer):
            return super().build_mlp(cfg, layer, tp, kernels)
        routing = Routing(
            top_k=cfg.moe_k,
            normalize=True,
            float32_logits=True,
            correction_bias=getattr(cfg, "moe_use_aux_free", True) is not False,
            norm_min=float(getattr(cfg, "moe_norm_min", 1e-12)),
        )
        shared = cfg.moe_intermediate_size * int(getattr(cfg, "moe_num_shared_experts", 0) or 0)
        shape = MoeShape(cfg.moe_num_experts, cfg.moe_intermediate_size, routing, shared)
        return SparseMoeBlock(cfg.hidden_size, shape, tp, kernels)

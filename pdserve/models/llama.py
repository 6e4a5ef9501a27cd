"""The Llama decoder (also the base of Qwen2 and Qwen3): pre-norm blocks of GQA attention and SwiGLU MLP.

Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are stacked into
`qkv_proj` and `gate_up_proj` (see layers/linear.py); `load_weight` maps checkpoint names onto them.
With tensor parallelism each rank builds the same modules over its slice: its KV head groups, its share
of the MLP columns and of the vocabulary (pdserve.distributed.sharding); norms are replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pdserve.distributed.group import TPGroup
from pdserve.distributed.sharding import model_head_shard, split
from pdserve.distributed.weights import load_full
from pdserve.kernels.ops import Kernels
from pdserve.kernels.split_k import Partials
from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.layers.attention.registry import make_backend
from pdserve.layers.linear import MergedLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from pdserve.layers.norm import RMSNorm
from pdserve.layers.rotary import RotaryEmbedding

# checkpoint name fragment -> (our module fragment, shard)
STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", "gate"),
    ".up_proj.": (".gate_up_proj.", "up"),
}


def head_dim_of(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: Any,
        rotary: RotaryEmbedding,
        kernels: Kernels,
        bias: bool,
        qk_norm: bool,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        shard = model_head_shard(cfg, tp.size, tp.rank)
        self.num_heads, self.num_kv_heads = shard.q_heads, shard.kv_heads  # this rank's
        d = self.head_dim = head_dim_of(cfg)
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        q_full, kv_full = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        rows = {
            "q": (q_full, shard.q_start * d, q_size),
            "k": (kv_full, shard.kv_start * d, kv_size),
            "v": (kv_full, shard.kv_start * d, kv_size),
        }
        self.qkv_proj = MergedLinear(cfg.hidden_size, rows, bias, kernels)
        self.o_proj = RowParallelLinear(
            q_full, cfg.hidden_size, (shard.q_start * d, q_size), False, tp, kernels
        )
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels) if qk_norm else None
        self.rotary = rotary
        scale = self.head_dim**-0.5
        self.attn = make_backend(kernels, self.num_heads, self.num_kv_heads, self.head_dim, scale)
        self.splits = [q_size, kv_size, kv_size]

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        norms = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out = self.attn.forward_rotary(self.rotary, positions, q, k, v, kv_cache, meta, norms)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Any, tp: TPGroup, kernels: Kernels) -> None:
        super().__init__()
        full = cfg.intermediate_size
        start, size = split(full, tp.size, tp.rank)
        rows = {"gate": (full, start, size), "up": (full, start, size)}
        self.gate_up_proj = MergedLinear(cfg.hidden_size, rows, False, kernels)
        self.down_proj = RowParallelLinear(full, cfg.hidden_size, (start, size), False, tp, kernels)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor | Partials:
        """The MLP's output, possibly as partial sums the next add-RMSNorm reduces (kernels/split_k.py)."""
        return self.down_proj.forward_partials(self.gate_up_proj.silu_mul(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, attn: Attention, mlp: nn.Module, kernels: Kernels) -> None:
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp  # MLP, or an MoE block (layers/moe.py): x -> tensor or Partials
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor | Partials,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor | Partials, torch.Tensor]:
        if residual is None:
            assert isinstance(x, torch.Tensor)  # the first layer's input: the embeddings
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.forward_residual(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm.forward_residual(h, residual)
        return self.mlp(h), residual


MlpBuilder = Callable[[int], nn.Module]  # layer index -> that layer's MLP (dense, or MoE)


class DecoderModel(nn.Module):
    def __init__(
        self, cfg: Any, kernels: Kernels, bias: bool, qk_norm: bool, tp: TPGroup, mlp: MlpBuilder
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg, head_dim_of(cfg), cfg.max_position_embeddings, kernels)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, Attention(cfg, rotary, kernels, bias, qk_norm, tp), mlp(i), kernels)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x: torch.Tensor | Partials = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = layer(positions, x, residual, kv_cache, meta)
            if meta.after_layer is not None:
                meta.after_layer(i)
        assert residual is not None
        return self.norm.forward_residual(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Token ids in, hidden states out (`forward`); `compute_logits` on the rows that sample."""

    qkv_bias_default = False
    qk_norm = False

    def __init__(self, cfg: Any, kernels: Kernels, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        tp = tp or TPGroup.single()
        bias = self.qkv_bias(cfg)
        self.model = DecoderModel(
            cfg, kernels, bias, self.qk_norm, tp, lambda i: self.build_mlp(cfg, i, tp, kernels)
        )
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def qkv_bias(self, cfg: Any) -> bool:
        return bool(getattr(cfg, "attention_bias", self.qkv_bias_default))

    def build_mlp(self, cfg: Any, layer: int, tp: TPGroup, kernels: Kernels) -> nn.Module:
        """Layer `layer`'s MLP: the dense SwiGLU here; MoE models return their expert block where it sits."""
        return MLP(cfg, tp, kernels)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weight(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> list[str]:
        """Copy one checkpoint tensor into place; returns the parameter names it filled."""
        if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return []
        for frag, (ours, shard) in STACKED.items():
            if frag in name:
                target = name.replace(frag, ours)
                module = self.get_submodule(target.rsplit(".", 1)[0])
                assert isinstance(module, MergedLinear)
                module.load_shard(shard, target.rsplit(".", 1)[1], tensor)
                return [f"{target}:{shard}"]
        if name not in params:
            raise KeyError(f"checkpoint tensor {name} has no place in {type(self).__name__}")
        load_full(params[name], tensor, name)  # this rank's slice of it
        return [name]

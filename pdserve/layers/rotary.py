"""Rotary position embedding (the rotate-half form HF Llama/Qwen use), with a cos/sin table per position.

Frequencies come from transformers' own rope initializers (default, llama3, yarn, linear, dynamic...),
so every scaling scheme a config names is computed the way the reference computes it. The rotation is
the model's chosen implementation (pdserve.kernels): Triton's in place, or the torch one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pdserve.kernels import rotary
from pdserve.kernels.ops import Kernels


def _inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        return inv.float(), float(scale)
    base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponent), 1.0


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # [max_positions, head_dim]
    sin: torch.Tensor

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels
        device = torch.get_default_device()  # the model is being built on it (`with torch.device`)
        with torch.device("cpu"):  # transformers' rope initializers work on the CPU
            inv_freq, scale = _inv_freq(hf_config, head_dim)
            positions = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).to(device), persistent=False)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # one step's lookup

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim]
        in_place = self.kernels.rotary
        if in_place is not None and q.is_cuda and q.stride(-1) == 1 and k.stride(-1) == 1:
            return in_place(positions, q, k, self.cos, self.sin)  # one launch: q and k are this layer's own
        cos, sin = self._tables(positions, q.dtype)
        return rotary.rotate(q, k, cos, sin)

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for this step's positions, looked up once per step, not once per layer."""
        if self._last is None or self._last[0] is not positions or self._last[1].dtype != dtype:
            cos = self.cos[positions].unsqueeze(1).to(dtype)
            self._last = (positions, cos, self.sin[positions].unsqueeze(1).to(dtype))
        return self._last[1], self._last[2]

"""Linear layers whose weights are several checkpoint tensors stacked along the output dimension.

`qkv_proj` holds q_proj, k_proj and v_proj; `gate_up_proj` holds gate_proj and up_proj. One matmul
instead of three or two; the loader copies each checkpoint tensor into its rows.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """nn.Linear with named row ranges, one per checkpoint tensor stacked into it."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shards: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shards.items():
            self.shards[name] = (start, size)
            start += size

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        start, size = self.shards[shard]
        target = self.weight if param == "weight" else self.bias
        assert target is not None
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard}.{param}: expected {size} rows, got {tuple(tensor.shape)}")
        with torch.no_grad():
            target[start : start + size].copy_(tensor)

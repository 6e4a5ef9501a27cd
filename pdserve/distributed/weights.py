"""Where each parameter's local tensor sits inside the full (tp=1) tensor, and copying full rows into it.

Checkpoint tensors, and the rows of random tensors that `--load-format dummy` draws, are always the full
model's; each rank keeps its part of them:

    column-parallel (qkv, gate_up, embedding, lm_head)   row segments: full rows [f, f+n) -> local [l, l+n)
    row-parallel (o_proj, down_proj)                      every row, the columns [c, c+m)
    replicated (norms, q/k norms)                         everything (no ParamShard attached)

A merged qkv weight has one segment per stacked tensor: full [q; k; v] rows map onto local [q_r; k_r; v_r].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_ATTR = "tp_shard"


@dataclass(frozen=True)
class ParamShard:
    full_shape: tuple[int, ...]
    segments: tuple[tuple[int, int, int], ...]  # (full row start, local row start, rows)
    cols: tuple[int, int] | None = None  # (start, size) of dim 1, for row-parallel weights

    @property
    def full_rows(self) -> int:
        return self.full_shape[0]

    @property
    def full_cols(self) -> int:  # the full tensor seen as [full_rows, full_cols]
        return math.prod(self.full_shape[1:])


def set_shard(param: torch.Tensor, shard: ParamShard) -> None:
    setattr(param, _ATTR, shard)


def shard_of(param: torch.Tensor) -> ParamShard:
    shard: ParamShard | None = getattr(param, _ATTR, None)
    if shard is not None:
        return shard
    rows = param.shape[0]
    return ParamShard(tuple(param.shape), ((0, 0, rows),))


def copy_full_rows(param: torch.Tensor, rows: torch.Tensor, first_row: int) -> None:
    """Copy rows `first_row..` of the full tensor (`rows`: [n, full_cols]) into this rank's part."""
    shard = shard_of(param)
    local = param.view(param.shape[0], -1)
    end = first_row + rows.shape[0]
    with torch.no_grad():
        for full_start, local_start, n in shard.segments:
            lo, hi = max(first_row, full_start), min(end, full_start + n)
            if lo >= hi:
                continue
            src = rows[lo - first_row : hi - first_row]
            if shard.cols is not None:
                src = src[:, shard.cols[0] : shard.cols[0] + shard.cols[1]]
            local[local_start + lo - full_start : local_start + hi - full_start].copy_(src)


def load_full(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Load a whole checkpoint tensor into this rank's part of `param`."""
    shard = shard_of(param)
    if tuple(tensor.shape) != shard.full_shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {shard.full_shape}")
    copy_full_rows(param, tensor.reshape(tensor.shape[0], -1), 0)

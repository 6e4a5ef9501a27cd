"""Which attention heads, MLP columns and vocabulary rows each tensor-parallel rank holds.

Splits are balanced and contiguous: `split(10, 4, r)` gives sizes 3, 3, 2, 2. Attention is split by
KV head groups, so a rank's query heads always sit with their KV heads:

    tp <= kv_heads: rank r takes a balanced range of whole KV groups (kv_heads=3, tp=2 -> 2 + 1)
    tp >  kv_heads: tp must be a multiple of kv_heads; the tp // kv_heads ranks of one group each keep
                    a copy of its KV head and a balanced share of its query heads (so num_heads >= tp)

Uneven splits are allowed (SmolLM2's 9 heads over 2 ranks: 6 + 3); they cost balance, not correctness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def split(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part `index` when `total` items are cut into `parts` contiguous, balanced parts."""
    base, extra = divmod(total, parts)
    return index * base + min(index, extra), base + (index < extra)


@dataclass(frozen=True)
class HeadShard:
    """The query and KV heads one rank holds (ranges in the full model's head numbering)."""

    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int


def check_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    if tp > num_kv_heads and tp % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {tp} exceeds the model's {num_kv_heads} KV heads and is not a multiple "
            f"of it: use a tp that divides into or is a multiple of {num_kv_heads}"
        )
    if tp > num_heads:
        raise ValueError(f"tensor_parallel_size {tp} exceeds the model's {num_heads} attention heads")


def head_shard(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadShard:
    check_heads(num_heads, num_kv_heads, tp)
    group = num_heads // num_kv_heads  # query heads per KV head
    if tp <= num_kv_heads:
        kv_start, kv_heads = split(num_kv_heads, tp, rank)
        return HeadShard(kv_start * group, kv_heads * group, kv_start, kv_heads)
    copies = tp // num_kv_heads  # ranks sharing one KV head
    kv = rank // copies
    q_start, q_heads = split(group, copies, rank % copies)
    return HeadShard(kv * group + q_start, q_heads, kv, 1)


def model_head_shard(hf_config: Any, tp: int, rank: int) -> HeadShard:
    return head_shard(hf_config.num_attention_heads, hf_config.num_key_value_heads, tp, rank)

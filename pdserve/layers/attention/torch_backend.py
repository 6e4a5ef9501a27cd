"""Pure-PyTorch paged attention: correct everywhere, fast enough on CPU.

Decodes are attended together (keys gathered through the block tables, padded, masked); each prompt
chunk is attended alone, causally, over its cached prefix plus itself.

An fp8 pool (--kv-cache-dtype fp8, e4m3) is written as K / k_scale and V / v_scale cast down (in
float32, as the Triton kernels do) and widened back to the queries' dtype where it is read; k_scale
is folded into the softmax scale and v_scale into the output. A chunk with no cached prefix attends
its own K/V as the pool holds them (rounded through e4m3), so its output does not depend on whether
the chunk came from the pool or not (chunked prefill, prefix hits, a disaggregated decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.layers.attention.backend import AttentionBackend
from pdserve.layers.attention.metadata import AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, H_kv, D], strided
        where = (meta.slot_mapping // meta.block_size, meta.slot_mapping % meta.block_size)
        k, v = _stored(k, k_cache.dtype, self.k_scale), _stored(v, v_cache.dtype, self.v_scale)
        k_cache.index_put_(where, k)  # by (block, offset): blocks are not adjacent
        v_cache.index_put_(where, v)
        k, v = k.to(q.dtype), v.to(q.dtype)  # fp8 pool: this step's K/V as read back from it
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for i in range(nd, meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if end - start == meta.context_lens[i]:  # no cached prefix: this step's K/V are all of it
                out[start:end] = self._causal(q[start:end], k[start:end], v[start:end])
            else:
                out[start:end] = self._prefill(q[start:end], k_cache, v_cache, meta, i)
        return out if self.v_scale == 1.0 else out * self.v_scale

    @property
    def _softmax_scale(self) -> float:
        return self.scale * self.k_scale

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, n, D]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=self._softmax_scale, enable_gqa=True
        )
        return out.transpose(0, 1)

    def _gather(
        self, cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        # block_table [..., nb] -> [..., H_kv, length, D] in `dtype`
        x = cache[block_table]  # [..., nb, block_size, H_kv, D]
        x = x.flatten(-4, -3)[..., :length, :, :].to(dtype)
        return x.transpose(-3, -2)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        nd = q.shape[0]
        max_len = max(meta.context_lens[:nd])
        nb = -(-max_len // meta.block_size)
        tables = meta.block_tables[:nd, :nb]
        keys = self._gather(k_cache, tables, max_len, q.dtype)  # [nd, H_kv, L, D]
        values = self._gather(v_cache, tables, max_len, q.dtype)
        mask = torch.arange(max_len, device=q.device)[None, :] < meta.seq_lens[:nd, None]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [nd, H, 1, D]
            keys,
            values,
            attn_mask=mask[:, None, None, :],
            scale=self._softmax_scale,
            enable_gqa=True,
        )
        return out.squeeze(2)

    def _prefill(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, i: int
    ) -> torch.Tensor:
        n, ctx = q.shape[0], meta.context_lens[i]
        nb = -(-ctx // meta.block_size)
        keys = self._gather(k_cache, meta.block_tables[i, :nb], ctx, q.dtype)  # [H_kv, ctx, D]
        values = self._gather(v_cache, meta.block_tables[i, :nb], ctx, q.dtype)
        qh = q.transpose(0, 1)  # [H, n, D]
        if n == ctx:
            out = F.scaled_dot_product_attention(
                qh, keys, values, is_causal=True, scale=self._softmax_scale, enable_gqa=True
            )
        else:
            q_pos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(
                qh, keys, values, attn_mask=mask, scale=self._softmax_scale, enable_gqa=True
            )
        return out.transpose(0, 1)


def _stored(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a pool of `dtype` holds it: x / scale, rounded once from float32 (a pool of x's own dtype
    has scale 1 and holds x itself)."""
    if dtype == x.dtype and scale == 1.0:
        return x
    return (x.float() * (1.0 / scale)).to(dtype)

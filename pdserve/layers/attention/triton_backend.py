"""The Triton attention backend: paged KV store, split-K decode and prefix-aware prefill kernels.

One step is at most three launches per layer (plus a reduce when decode splits): rotary (after
Qwen3's q/k norms) fused with storing this step's K/V by slot (kernels/triton_rotary.py), decode the
first `num_decodes` sequences, prefill the rest. Both attention kernels read this step's K/V from
the cache, so k is never needed rotated in place. A decode-only step skips the rotary launch: the
decode kernel rotates, stores and attends the new token itself (kernels/attention/triton_new_token.py;
KernelConfig.decode_rotary=off keeps the launch). The launches come bound in an AttentionKernels
(pdserve.kernels.factory), so this module itself never imports triton.
"""

from __future__ import annotations

import torch

from pdserve.host_tensors import to_device
from pdserve.kernels.attention.new_token import NewToken
from pdserve.kernels.ops import AttentionKernels
from pdserve.layers.attention.backend import AttentionBackend
from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.layers.norm import RMSNorm
from pdserve.layers.rotary import RotaryEmbedding


def _fusable(qk_norm: tuple[RMSNorm, RMSNorm] | None, dtype: torch.dtype) -> bool:
    """Can the rotary kernel apply these per-head norms as RMSNorm would: one eps, and weights of the
    activations' dtype (RMSNorm's output takes the wider of the two)."""
    return qk_norm is None or (
        qk_norm[0].eps == qk_norm[1].eps and qk_norm[0].weight.dtype == qk_norm[1].weight.dtype == dtype
    )


class TritonAttentionBackend(AttentionBackend):
    cuda_graph_safe = True  # decode reads device tensors only; padded rows (slot -1, length 0) are inert

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops: AttentionKernels
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.ops = ops

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        self.ops.store_kv(k, v, kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self._attend(q, kv_cache, meta)

    def forward_rotary(
        self,
        rotary: RotaryEmbedding,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        if not all(x.stride(-1) == 1 for x in (q, k, v)) or not _fusable(qk_norm, q.dtype):
            return super().forward_rotary(rotary, positions, q, k, v, kv_cache, meta, qk_norm)
        norms = None if qk_norm is None else (qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps)
        if self.ops.decode_rotary and meta.num_decodes == meta.num_seqs == q.shape[0]:  # decodes only
            out = torch.empty_like(q)
            new = NewToken(k, v, positions, rotary.cos, rotary.sin, meta.slot_mapping, norms)
            self._decode(q, kv_cache, meta, out, new)
            return out
        self.ops.rotary_store_kv(
            positions, q, k, v, rotary.cos, rotary.sin, kv_cache, meta.slot_mapping, norms,
            k_scale=self.k_scale, v_scale=self.v_scale,
        )  # fmt: skip
        return self._attend(q, kv_cache, meta)

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q over the cache, which already holds this step's K/V."""
        out = torch.empty_like(q)  # [T, num_heads, head_dim]
        nd = meta.num_decodes
        if nd:
            self._decode(q, kv_cache, meta, out)
        if meta.num_seqs > nd:
            qsl = _device_query_start_loc(meta, q.device)
            self.ops.paged_prefill(
                q,
                kv_cache,
                meta.block_tables[nd:],
                meta.seq_lens[nd:],
                qsl[nd:],
                out,
                self.scale,
                token_base=meta.query_start_loc[nd],
                num_tokens=q.shape[0] - meta.query_start_loc[nd],
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        return out

    def _decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
        new_token: NewToken | None = None,  # every row a decode, q not yet rotated
    ) -> None:
        nd = meta.num_decodes
        max_len = max(meta.context_lens[:nd])
        splits = self.ops.num_splits(nd, self.num_kv_heads, max_len, q.device)
        tables, lens = meta.block_tables[:nd], meta.seq_lens[:nd]
        self.ops.paged_decode(
            q[:nd], kv_cache, tables, lens, out[:nd], self.scale, splits, new_token=new_token,
            k_scale=self.k_scale, v_scale=self.v_scale,
        )  # fmt: skip


def _device_query_start_loc(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """meta.query_start_loc_t, copied over once per step (by the first layer) when the runner left it out."""
    if meta.query_start_loc_t is None:
        meta.query_start_loc_t = to_device(torch.tensor(meta.query_start_loc, dtype=torch.int32), device)
    return meta.query_start_loc_t

"""Rotary position embedding for q and k in one Triton launch, in place (the CUDA hot path).

The torch code in rotary.py costs five kernels for q and five for k per layer (two products, a
negation, a concatenation, a sum): ~640 launches per decode step of a 64-layer model. This kernel
reads each token's position, its cos/sin row (the first half: the table repeats it), and rotates every
head of q and k in fp32, rounding once to the input dtype.

Like triton_fused.py, rotary.py imports this module only for CUDA tensors, so a CPU process never
imports triton unless a test sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(base, heads, dims, dmask, stride_h, c, s, NUM_HEADS: tl.constexpr, HALF: tl.constexpr):  # type: ignore[no-untyped-def]
        mask = (heads[:, None] < NUM_HEADS) & dmask[None, :]
        offs = heads[:, None] * stride_h + dims[None, :]
        x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c[None, :] - x2 * s[None, :]
        out2 = x2 * c[None, :] + x1 * s[None, :]
        tl.store(base + offs, out1.to(base.dtype.element_ty), mask=mask)
        tl.store(base + offs + HALF, out2.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_table,
        NUM_Q_HEADS: tl.constexpr,
        NUM_K_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + token).to(tl.int64)
        dims = tl.arange(0, BLOCK_HALF)
        dmask = dims < HALF
        c = tl.load(cos_ptr + pos * stride_table + dims, mask=dmask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_table + dims, mask=dmask, other=0.0).to(tl.float32)
        heads = tl.arange(0, BLOCK_H)
        _rotate_heads(q_ptr + token * stride_qt, heads, dims, dmask, stride_qh, c, s, NUM_Q_HEADS, HALF)
        _rotate_heads(k_ptr + token * stride_kt, heads, dims, dmask, stride_kh, c, s, NUM_K_HEADS, HALF)


def triton_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by cos/sin [max_positions, D] at `positions`."""
    tokens, num_q, head_dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](
            q,
            k,
            positions,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            NUM_Q_HEADS=num_q,
            NUM_K_HEADS=k.shape[1],
            HALF=half,
            BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q, k

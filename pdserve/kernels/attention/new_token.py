"""NewToken: what the decode kernel is handed to rotate, store and attend each sequence's one new token
itself (triton_new_token.py holds the device code). No triton here: the attention backend builds it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NewToken:
    """What the decode kernel needs to rotate, store and attend each sequence's one new token."""

    k: torch.Tensor  # [B, Hk, D], not rotated (the qkv projection's view)
    v: torch.Tensor  # [B, Hk, D]
    positions: torch.Tensor  # [B]
    cos: torch.Tensor  # [max_positions, D] (its halves repeat)
    sin: torch.Tensor
    slots: torch.Tensor  # [B] cache slots; negative: a padded row, nothing written
    norms: tuple[torch.Tensor, torch.Tensor, float] | None = None  # q's, k's RMSNorm weights, eps

    def kernel_args(self, q: torch.Tensor, k_scale: float, v_scale: float) -> list[object]:
        """The split kernel's new-token arguments, in its order (the pool holds K / k_scale, V / v_scale)."""
        assert all(x.stride(-1) == 1 for x in (q, self.k, self.v, self.cos))
        assert self.cos.stride() == self.sin.stride()
        qw, kw, eps = self.norms if self.norms is not None else (q, q, 0.0)
        k, v = self.k, self.v
        return [k, v, self.positions, self.cos, self.sin, self.slots, qw, kw, eps,
                1.0 / k_scale, 1.0 / v_scale,
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), self.cos.stride(0)]  # fmt: skip


def kernel_args(
    new_token: NewToken | None, q: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0
) -> list[object]:
    """The split kernel's new-token arguments; without a new token, unused stand-ins in their places."""
    if new_token is not None:
        return new_token.kernel_args(q, k_scale, v_scale)
    return [*[q] * 8, 0.0, 1.0, 1.0, *[0] * 5]

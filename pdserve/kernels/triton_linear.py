"""The model's projections when Triton is chosen: F.linear, or for a few rows of x (decode at small
batch) the skinny GEMM (triton_skinny.py) where its tuning gives a tile; gate_up with SiLU * up in
the same kernel's epilogue where that was measured faster, else the product then triton_fused's
silu_and_mul. This module imports triton (through the kernels): only the factory imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels import triton_fused, triton_skinny
from pdserve.kernels.pdl import Pdl
from pdserve.kernels.tuning.tables import SkinnyTuning, Tile


@dataclass(frozen=True)
class Projections:
    """`skinny` None: the skinny GEMM off (F.linear always); `gated_rows`: gate_up tiles at 17-64 rows."""

    skinny: SkinnyTuning | None
    gated_rows: bool
    pdl: Pdl

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight^T (+ bias): F.linear, or the skinny kernel where tile_for gives a tile."""
        return self._product(x, weight, bias, self._tile(x, weight, bias))

    def silu_mul_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """SiLU(x @ gate^T) * (x @ up^T) for weight = gate stacked over up: one skinny-GEMM launch where
        tile_for gives a wide enough tile (the activation in its epilogue) or, where it gives none,
        gated_rows_tile does (measured shapes, 17-64 rows); else the GEMM then silu_and_mul."""
        tile = self._tile(x, weight, None)
        t = self.skinny
        if t is not None:
            if tile is not None and tile[0] >= t.fused_min_width:
                return triton_skinny.skinny_linear(x, weight, tile, gated=True, pdl=self.pdl)
            rows_tile = (
                triton_skinny.gated_rows_tile(x, weight, t) if tile is None and self.gated_rows else None
            )
            if rows_tile is not None:
                return triton_skinny.skinny_linear(x, weight, rows_tile, gated=True, pdl=self.pdl)
        return triton_fused.silu_and_mul(self._product(x, weight, None, tile), self.pdl)

    def _tile(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Tile | None:
        if self.skinny is None or not x.is_cuda:
            return None
        return triton_skinny.tile_for(x, weight, bias, self.skinny)

    def _product(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: Tile | None
    ) -> torch.Tensor:
        """x @ weight^T (+ bias) with the skinny kernel's `tile` (given for bias-free weights only), or
        F.linear without one."""
        if tile is None:
            return F.linear(x, weight, bias)
        assert bias is None
        return triton_skinny.skinny_linear(x, weight, tile, pdl=self.pdl)

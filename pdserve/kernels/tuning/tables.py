"""The kernels' tuning tables: one JSON file per device family beside this module, loaded into frozen types.

    skinny   the decode GEMM (triton_skinny.py): rows it takes, tile widths, wave fill, K steps, and the
             gate_up tiles with SiLU * up fused, per measured (2 x intermediate, hidden) shape
    split_k  down_proj (N, K) shapes and the row ranges that take K-split partials (split_k.py)
    pdl      the row counts up to which launches ask for programmatic dependent launch (pdl.py)
    decode   the decode-attention split-K limits (attention/triton_decode.py)
    attention  the prefill and decode kernels' tiles, by dtype and head size

`KernelConfig.tuning` picks the file: "auto" by the device's compute capability (FAMILIES), or a path.
Every value in hopper.json was measured on one H200 (Hopper, sm_90; docs/performance.md). It is also the
default for every other family and for the CPU (Triton's interpreter): shapes missing from its tables
take the generic rule (plan() over the device's SMs for the skinny GEMM; cuBLAS for gate_up at 17-64
rows and for down_proj), which is correct everywhere and was measured as the safe choice on Hopper.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Tile = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, stages, warps)
Shape = tuple[int, int]  # a weight's (N, K)
HERE = Path(__file__).parent
FAMILIES = {9: "hopper"}  # compute capability major -> tuning file
DEFAULT_FAMILY = "hopper"  # everything else, the CPU included


@dataclass(frozen=True)
class SkinnyTuning:
    """triton_skinny.py's tables."""

    max_rows: int  # up to this many rows of x; past 16 only one-wave grids (plan())
    min_weight: int  # elements of W at least
    widths: tuple[int, ...]  # output columns per program (BLOCK_N) plan() picks from
    min_wave_fill: float  # programs / (waves x SMs) a tile must reach, else F.linear
    one_wave: tuple[int, int]  # (BLOCK_K, stages) when the programs fit in one wave
    many_waves: tuple[int, int]  # the same for several waves
    fused_min_width: int  # gate_up tiles at least this wide take SiLU * up in the epilogue
    gated_rows: tuple[int, int]  # rows of x where gated_tiles may take gate_up
    default_sms: int  # the SMs default_tile() plans for
    gated_tiles: dict[Shape, tuple[tuple[int, Tile | None], ...]]  # (up to rows, tile or None: cuBLAS)


@dataclass(frozen=True)
class AttentionTiles:
    """The attention kernels' tiles: prefill (BLOCK_M, BLOCK_N, warps, stages), decode (BLOCK_N, warps,
    stages); fp32 inputs take smaller ones, heads over 128 dims a narrower prefill key tile."""

    prefill_fp32: tuple[int, int, int, int]
    prefill_wide_heads: tuple[int, int, int, int]
    prefill: tuple[int, int, int, int]
    decode_fp32: tuple[int, int, int]
    decode: tuple[int, int, int]

    def prefill_tile(self, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
        if dtype == torch.float32:
            return self.prefill_fp32
        return self.prefill_wide_heads if head_dim > 128 else self.prefill

    def decode_tile(self, dtype: torch.dtype) -> tuple[int, int, int]:
        return self.decode_fp32 if dtype == torch.float32 else self.decode


@dataclass(frozen=True)
class Tuning:
    """All the tables of one device family."""

    family: str
    skinny: SkinnyTuning
    split_k: dict[Shape, tuple[tuple[int, int, int], ...]]  # (first rows, last rows, S)
    pdl_max_rows: int | None  # launches over more rows go without PDL (None: no limit)
    pdl_attention_max_rows: int | None  # the same for the decode-attention kernels
    decode_max_splits: int
    decode_min_split_tokens: int  # a partition shorter than this costs more to merge than it saves
    attention: AttentionTiles


def tuning_for(spec: str, device: torch.device) -> Tuning:
    """The tables `spec` names: "auto" (by `device`'s family) or a path to a tuning JSON file."""
    if spec != "auto":
        return load(str(Path(spec).expanduser().resolve()))
    family = DEFAULT_FAMILY
    if device.type == "cuda":
        family = FAMILIES.get(torch.cuda.get_device_capability(device)[0], DEFAULT_FAMILY)
    return load(str(HERE / f"{family}.json"))


@functools.lru_cache(maxsize=8)
def load(path: str) -> Tuning:
    """The Tuning in the JSON file at `path`."""
    data = json.loads(Path(path).read_text())
    pdl, decode = data["pdl"], data["decode"]
    return Tuning(
        family=str(data["family"]),
        skinny=_skinny(data["skinny"]),
        split_k={_shape(e["shape"]): tuple(_ints(r, 3) for r in e["splits"]) for e in data["split_k"]},
        pdl_max_rows=_optional_int(pdl["max_rows"]),
        pdl_attention_max_rows=_optional_int(pdl["attention_max_rows"]),
        decode_max_splits=int(decode["max_splits"]),
        decode_min_split_tokens=int(decode["min_split_tokens"]),
        attention=_attention(data["attention"]),
    )


def _attention(a: dict[str, Any]) -> AttentionTiles:
    return AttentionTiles(
        prefill_fp32=_ints(a["prefill_fp32"], 4),
        prefill_wide_heads=_ints(a["prefill_wide_heads"], 4),
        prefill=_ints(a["prefill"], 4),
        decode_fp32=_ints(a["decode_fp32"], 3),
        decode=_ints(a["decode"], 3),
    )


def _skinny(s: dict[str, Any]) -> SkinnyTuning:
    return SkinnyTuning(
        max_rows=int(s["max_rows"]),
        min_weight=int(s["min_weight"]),
        widths=tuple(int(w) for w in s["widths"]),
        min_wave_fill=float(s["min_wave_fill"]),
        one_wave=_ints(s["one_wave"], 2),
        many_waves=_ints(s["many_waves"], 2),
        fused_min_width=int(s["fused_min_width"]),
        gated_rows=_ints(s["gated_rows"], 2),
        default_sms=int(s["default_sms"]),
        gated_tiles={
            _shape(e["shape"]): tuple(
                (int(rows), None if t is None else _ints(t, 4)) for rows, t in e["tiles"]
            )
            for e in s["gated_tiles"]
        },
    )


def _shape(values: list[int]) -> Shape:
    return _ints(values, 2)


def _ints(values: list[int], n: int) -> Any:
    if len(values) != n:
        raise ValueError(f"tuning: expected {n} integers, got {values!r}")
    return tuple(int(v) for v in values)


def _optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)

"""A profile: what one instance of a model costs on one machine, as `pdserve profile` measured it.

    prefill   seconds of a step computing a chunk of `tokens` after `cached` prefix tokens  (grid)
    decode    seconds of a decode step of `batch` sequences of `context` tokens each         (grid)
    mixed     seconds of a step computing a `tokens` prompt chunk beside `batch` decodes of one
              context (grid; optional: without it costs.py composes mixed steps from the two above)
    transfer  per KV transport, seconds to hand `bytes` of KV from a prefill to a decode     (curve)
    pool      block_size, num_blocks, kv_bytes_per_token (the KV capacity of one instance)
    front     per request, outside the engine's steps: a fixed part (HTTP in, the hand-off to the
              engine, the first token's way back) plus tokenization per prompt token (optional: 0)

plus the instance's scheduler limits, its TP, and where it was measured (machine, versions, date).
Between measured points costs are linear, beyond them linearly extrapolated (never below zero).
This module holds the numbers and reads/writes them; it measures nothing (profiler.py does).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "pdserve-profile/1"


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended linearly beyond both ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class Curve:
    """y(x) through measured points (xs ascending)."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.xs or len(self.xs) != len(self.ys) or list(self.xs) != sorted(set(self.xs)):
            raise ValueError("a curve needs ascending distinct xs, one y each")

    def at(self, x: float) -> float:
        return max(0.0, _interp(self.xs, self.ys, x))


@dataclass(frozen=True)
class Grid:
    """z(x, y) measured at every (xs[i], ys[j]): values[i][j]; bilinear between the points."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        Curve(self.xs, self.xs)  # validates the axes
        Curve(self.ys, self.ys)
        if len(self.values) != len(self.xs) or any(len(row) != len(self.ys) for row in self.values):
            raise ValueError("a grid needs one value per (x, y)")

    def at(self, x: float, y: float) -> float:
        along_y = [_interp(self.ys, row, y) for row in self.values]
        return max(0.0, _interp(self.xs, along_y, x))

    def to_json(self, x: str, y: str) -> dict[str, Any]:
        return {x: list(self.xs), y: list(self.ys), "seconds": [list(r) for r in self.values]}

    @classmethod
    def from_json(cls, obj: dict[str, Any], x: str, y: str) -> Grid:
        return cls(tuple(obj[x]), tuple(obj[y]), tuple(tuple(float(v) for v in r) for r in obj["seconds"]))


@dataclass(frozen=True)
class MixedGrid:
    """Mixed steps as measured: x prompt tokens, y decode batch, the decodes at `context` tokens."""

    grid: Grid
    context: float

    def to_json(self) -> dict[str, Any]:
        return {**self.grid.to_json("tokens", "batch"), "context": self.context}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MixedGrid:
        return cls(Grid.from_json(obj, "tokens", "batch"), float(obj["context"]))


@dataclass(frozen=True)
class Front:
    """What a request costs in the server's front, outside the engine: seconds added to its TTFT
    and latency (never to TPOT). A profile without a front section has the zero one."""

    fixed_s: float = 0.0
    per_token_s: float = 0.0  # tokenizing the prompt, per prompt token
    source: dict[str, Any] = field(default_factory=dict)  # what was measured, and how
    # the chance that a generated token has text: below 1 for dummy weights, whose ids are uniform
    # over the model's vocabulary, of which the tokenizer may know only part (a client's TTFT waits
    # for the first token with text)
    visible_fraction: float = 1.0
    # the fixed part when the request reaches an engine that is stepping (None: as fixed_s): the
    # front and the engine loop share one process, and the loop's host work delays the front's
    busy_fixed_s: float | None = None

    def __post_init__(self) -> None:
        if self.fixed_s < 0 or self.per_token_s < 0 or (self.busy_fixed_s or 0.0) < 0:
            raise ValueError("a front's costs are never negative")
        if not 0 < self.visible_fraction <= 1:
            raise ValueError("visible_fraction must be in (0, 1]")

    def seconds(self, prompt_tokens: int, busy: bool = False) -> float:
        fixed = self.busy_fixed_s if busy and self.busy_fixed_s is not None else self.fixed_s
        return fixed + self.per_token_s * prompt_tokens

    def to_json(self) -> dict[str, Any]:
        costs = {"fixed_s": self.fixed_s, "per_token_s": self.per_token_s, "busy_fixed_s": self.busy_fixed_s}
        return {**costs, "visible_fraction": self.visible_fraction, **self.source}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Front:
        own = ("fixed_s", "per_token_s", "visible_fraction", "busy_fixed_s")
        busy = obj.get("busy_fixed_s")
        return cls(
            float(obj.get("fixed_s", 0.0)),
            float(obj.get("per_token_s", 0.0)),
            {k: v for k, v in obj.items() if k not in own},
            float(obj.get("visible_fraction", 1.0)),
            None if busy is None else float(busy),
        )


@dataclass(frozen=True)
class Profile:
    """One instance (TP ranks included) of one model on one machine."""

    model: str
    tp: int
    block_size: int
    num_blocks: int
    kv_bytes_per_token: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefill: Grid  # x: chunk tokens, y: cached prefix tokens
    decode: Grid  # x: batch, y: context tokens per sequence
    transfer: dict[str, Curve] = field(default_factory=dict)  # transport -> seconds by bytes
    meta: dict[str, Any] = field(default_factory=dict)  # machine, device, versions, date, command
    front: Front = field(default_factory=Front)
    mixed: MixedGrid | None = None

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def transfer_seconds(self, num_bytes: int, transport: str | None = None) -> float:
        """Hand-off time of `num_bytes` on `transport` (None: the fastest one profiled; none: free)."""
        if not self.transfer:
            return 0.0
        if transport is not None:
            if transport not in self.transfer:
                raise ValueError(f"transport {transport!r} not in the profile ({', '.join(self.transfer)})")
            return self.transfer[transport].at(num_bytes)
        return min(curve.at(num_bytes) for curve in self.transfer.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "tp": self.tp,
            "kv": {
                "block_size": self.block_size,
                "num_blocks": self.num_blocks,
                "bytes_per_token": self.kv_bytes_per_token,
            },
            "scheduler": {
                "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens,
            },
            "prefill": self.prefill.to_json("tokens", "cached"),
            "decode": self.decode.to_json("batch", "context"),
            "transfer": {k: {"bytes": list(c.xs), "seconds": list(c.ys)} for k, c in self.transfer.items()},
            **({"front": self.front.to_json()} if self.front != Front() else {}),
            **({"mixed": self.mixed.to_json()} if self.mixed is not None else {}),
            **self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Profile:
        if obj.get("format") != FORMAT:
            raise ValueError(f"not a pdserve profile (format {obj.get('format')!r}, expected {FORMAT})")
        known = {
            "format",
            "model",
            "tp",
            "kv",
            "scheduler",
            "prefill",
            "decode",
            "transfer",
            "front",
            "mixed",
        }
        return cls(
            model=str(obj["model"]),
            tp=int(obj["tp"]),
            block_size=int(obj["kv"]["block_size"]),
            num_blocks=int(obj["kv"]["num_blocks"]),
            kv_bytes_per_token=int(obj["kv"]["bytes_per_token"]),
            max_num_seqs=int(obj["scheduler"]["max_num_seqs"]),
            max_num_batched_tokens=int(obj["scheduler"]["max_num_batched_tokens"]),
            prefill=Grid.from_json(obj["prefill"], "tokens", "cached"),
            decode=Grid.from_json(obj["decode"], "batch", "context"),
            transfer={
                k: Curve(tuple(v["bytes"]), tuple(float(s) for s in v["seconds"]))
                for k, v in obj.get("transfer", {}).items()
            },
            meta={k: v for k, v in obj.items() if k not in known},
            front=Front.from_json(obj.get("front", {})),
            mixed=MixedGrid.from_json(obj["mixed"]) if "mixed" in obj else None,
        )

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_json(json.loads(Path(path).read_text()))


def constant_profile(
    prefill_s: float,
    decode_s: float,
    transfer_s: float = 0.0,
    num_blocks: int = 4096,
    block_size: int = 16,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    tp: int = 1,
) -> Profile:
    """Every prefill step costs `prefill_s`, every decode step `decode_s`, every hand-off `transfer_s`:
    the closed-form cases (queueing theory) the simulator is checked against."""
    flat = ((prefill_s, prefill_s), (prefill_s, prefill_s))
    return Profile(
        model="constant",
        tp=tp,
        block_size=block_size,
        num_blocks=num_blocks,
        kv_bytes_per_token=1,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        prefill=Grid((1.0, 2.0), (0.0, 1.0), flat),
        decode=Grid((1.0, 2.0), (1.0, 2.0), ((decode_s, decode_s), (decode_s, decode_s))),
        transfer={"constant": Curve((0.0, 1.0), (transfer_s, transfer_s))},
    )

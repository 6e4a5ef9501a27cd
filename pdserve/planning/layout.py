"""A layout: how many instances of each role, and each role's tensor-parallel size.

    colocated:K          K instances that prefill and decode their own requests ("both")
    pd:P:D               P prefill + D decode instances
    ...@tpN / @tpP,D     TP of every instance (colocated) or of the prefill and decode roles (pd)

e.g. `colocated:4`, `pd:2:1@tp2,1`. GPUs used: K * tp, or P * tp_prefill + D * tp_decode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN = re.compile(r"(colocated):(\d+)(?:@tp(\d+))?|(pd):(\d+):(\d+)(?:@tp(\d+)(?:,(\d+))?)?")


@dataclass(frozen=True)
class Layout:
    colocated: int = 0
    prefill: int = 0
    decode: int = 0
    tp: int = 1  # colocated instances
    tp_prefill: int = 1
    tp_decode: int = 1

    def __post_init__(self) -> None:
        if (
            min(self.colocated, self.prefill, self.decode) < 0
            or min(self.tp, self.tp_prefill, self.tp_decode) < 1
        ):
            raise ValueError("instance counts must be >= 0 and TP sizes >= 1")
        if bool(self.colocated) == bool(self.prefill or self.decode):
            raise ValueError("a layout is either colocated:K or pd:P:D")
        if not self.colocated and not (self.prefill and self.decode):
            raise ValueError("pd:P:D needs at least one prefill and one decode instance")

    @property
    def disaggregated(self) -> bool:
        return not self.colocated

    @property
    def gpus(self) -> int:
        if self.colocated:
            return self.colocated * self.tp
        return self.prefill * self.tp_prefill + self.decode * self.tp_decode

    @property
    def tps(self) -> set[int]:
        """The TP sizes whose profiles this layout needs."""
        return {self.tp} if self.colocated else {self.tp_prefill, self.tp_decode}

    def __str__(self) -> str:
        if self.colocated:
            return f"colocated:{self.colocated}" + (f"@tp{self.tp}" if self.tp > 1 else "")
        tp = f"@tp{self.tp_prefill},{self.tp_decode}" if (self.tp_prefill, self.tp_decode) != (1, 1) else ""
        return f"pd:{self.prefill}:{self.decode}{tp}"


def parse_layout(text: str) -> Layout:
    m = _PATTERN.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a layout: {text!r} (try colocated:2, pd:1:1, pd:2:1@tp2,1)")
    if m.group(1):
        return Layout(colocated=int(m.group(2)), tp=int(m.group(3) or 1))
    tp_p = int(m.group(7) or 1)
    return Layout(
        prefill=int(m.group(5)), decode=int(m.group(6)), tp_prefill=tp_p, tp_decode=int(m.group(8) or tp_p)
    )


def layouts_for(gpus: int, tps: set[int]) -> list[Layout]:
    """Every layout that uses exactly `gpus` GPUs with TP sizes from `tps` (colocated first)."""
    out = [Layout(colocated=gpus // t, tp=t) for t in sorted(tps) if gpus % t == 0]
    for tp_p in sorted(tps):
        for tp_d in sorted(tps):
            for p in range(1, gpus // tp_p + 1):
                rest = gpus - p * tp_p
                if rest >= tp_d and rest % tp_d == 0:
                    out.append(Layout(prefill=p, decode=rest // tp_d, tp_prefill=tp_p, tp_decode=tp_d))
    return out

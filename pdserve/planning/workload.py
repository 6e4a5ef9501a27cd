"""A workload: when requests arrive and how long their prompts and answers are.

Three sources, one result (a list of RequestSpec, by arrival):
    synthetic   lengths uniform in len * (1 +- range_ratio) (as `pdserve bench serve --range-ratio`),
                arrivals Poisson at `rate`, or bursty: gamma gaps of the same mean with shape
                `burstiness` (1: Poisson, below 1: burstier, as vLLM's --burstiness)
    observed    the router's /pd/workload (router/workload.py): its rate, burstiness and (input,
                output) length pairs, resampled
    trace       a file of {"arrival": s, "input_len": n, "output_len": m} objects (a JSON list, or
                one object a line)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RequestSpec:
    arrival: float  # seconds from the start
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    input_len: int = 1100
    output_len: int = 140
    range_ratio: float = 0.0
    rate: float = 1.0  # requests a second; inf: all at once
    burstiness: float = 1.0
    num_requests: int = 200
    seed: int = 0
    pairs: tuple[tuple[int, int], ...] = ()  # observed (input, output) lengths: drawn instead

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.burstiness > 0 or self.num_requests < 1:
            raise ValueError("rate and burstiness must be > 0, and num_requests >= 1")
        if not 0 <= self.range_ratio < 1 or min(self.input_len, self.output_len) < 1:
            raise ValueError("lengths must be >= 1 and range_ratio in [0, 1)")

    def at_rate(self, rate: float, num_requests: int | None = None) -> Workload:
        return replace(self, rate=rate, num_requests=num_requests or self.num_requests)

    def requests(self) -> list[RequestSpec]:
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for _ in range(self.num_requests):
            n_in, n_out = self._lengths(rng)
            out.append(RequestSpec(t, n_in, n_out))
            if not math.isinf(self.rate):
                t += rng.gammavariate(self.burstiness, 1.0 / (self.rate * self.burstiness))
        return out

    def _lengths(self, rng: random.Random) -> tuple[int, int]:
        if self.pairs:
            return rng.choice(self.pairs)
        r = self.range_ratio
        n_in = rng.randint(max(1, int(self.input_len * (1 - r))), int(self.input_len * (1 + r)))
        n_out = rng.randint(max(1, int(self.output_len * (1 - r))), int(self.output_len * (1 + r)))
        return n_in, n_out

    def describe(self) -> dict[str, Any]:
        shape = f"{len(self.pairs)} observed length pairs" if self.pairs else None
        return {
            "input_len": self.input_len,
            "output_len": self.output_len,
            "range_ratio": self.range_ratio,
            "lengths": shape or "uniform",
            "rate": "inf" if math.isinf(self.rate) else self.rate,
            "burstiness": self.burstiness,
            "num_requests": self.num_requests,
            "seed": self.seed,
        }


def from_router(obj: dict[str, Any], num_requests: int = 200, seed: int = 0) -> Workload:
    """The workload a router observed (GET /pd/workload): its rate, burstiness and length pairs."""
    samples = [(int(s[1]), int(s[2])) for s in obj.get("samples", []) if int(s[1]) > 0 and int(s[2]) > 0]
    if not samples:
        raise ValueError("the router has observed no requests yet")
    rate = float(obj.get("arrival_rate") or 0.0)
    if not rate > 0:
        raise ValueError("the router reports no arrival rate yet")
    mean_in = round(sum(p[0] for p in samples) / len(samples))
    mean_out = round(sum(p[1] for p in samples) / len(samples))
    burstiness = float(obj.get("burstiness") or 1.0)
    return Workload(mean_in, mean_out, 0.0, rate, burstiness, num_requests, seed, tuple(samples))


def load_trace(path: str | Path) -> list[RequestSpec]:
    text = Path(path).read_text()
    items = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    specs = [RequestSpec(float(i["arrival"]), int(i["input_len"]), int(i["output_len"])) for i in items]
    if not specs or any(s.input_len < 1 or s.output_len < 1 for s in specs):
        raise ValueError(f"{path}: a trace needs requests with input_len and output_len >= 1")
    return sorted(specs, key=lambda s: s.arrival)

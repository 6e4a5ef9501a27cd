"""Arrivals, the concurrency cap and the progress bar: BenchRequests in, RequestResults and wall time out.

Request i *arrives* at offset t_i: all at t=0 for rate inf, else a Poisson process (exponential gaps of
mean 1/rate, seeded). An arrived request is sent at once, or, under `max_concurrency`, as soon as fewer
than that many are in flight (then its TTFT counts from when it was sent, not from its arrival).
`duration` runs from the first arrival to the end of the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from pdserve.bench.client import RequestResult, Target, send
from pdserve.bench.dataset import BenchRequest


@dataclass(frozen=True)
class RunOutcome:
    results: list[RequestResult]
    duration: float
    start: float  # perf_counter() at the first arrival


def arrival_offsets(num: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds from the start at which each request arrives: 0 for all at rate inf, else Poisson."""
    if not rate > 0:
        raise ValueError(f"request rate must be positive: {rate}")
    if math.isinf(rate):
        return [0.0] * num
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def run_requests(
    target: Target,
    requests: Sequence[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RunOutcome:
    """Send every request on its arrival schedule; wait for all of them to end."""
    offsets = arrival_offsets(len(requests), request_rate, random.Random(seed))
    gate: Any = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    bar = tqdm(
        total=len(requests), disable=not progress, unit="req", desc=_describe(request_rate, max_concurrency)
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(target.timeout), limits=limits) as client:

        async def one(request: BenchRequest) -> RequestResult:
            async with gate:
                result = await send(client, target, request)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, offset in zip(requests, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return RunOutcome(results, duration, start)


def _describe(rate: float, max_concurrency: int | None) -> str:
    shown = "inf" if math.isinf(rate) else f"{rate:g}/s"
    return f"rate {shown}" + (f", concurrency {max_concurrency}" if max_concurrency else "")

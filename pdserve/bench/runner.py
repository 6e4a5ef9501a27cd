"""Sending a run: arrivals, the concurrency cap, the duration limit, the progress bar.

Request i *arrives* at offset t_i (arrivals.py: all at once, constant rate or Poisson, seeded). An
arrived request is sent at once, or, under `max_concurrency`, as soon as fewer than that many are in
flight (then its TTFT counts from when it was sent, not from its arrival).

With a duration limit S, nothing is sent at or after S (an arrival later than S, or one still waiting
for a concurrency slot at S, is *not sent*). Requests in flight at S are either waited for (`wait`, the
default: they finish and count, the run lasts past S) or cancelled (`cut`: their connections close,
which aborts them on the server; they count as cut, neither completed nor failed, and the run lasts S).

`duration` runs from the first arrival to the end of the last answer (or to the cut).
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

from pdserve.bench.arrivals import arrival_offsets
from pdserve.bench.client import RequestResult, Target, send
from pdserve.bench.dataset import BenchRequest

AT_LIMIT = ("wait", "cut")
CUT_ERROR = "cut at the duration limit"


@dataclass(frozen=True)
class Load:
    """How a run's requests are offered: their arrival schedule, the in-flight cap, the time limit."""

    rate: float = math.inf
    arrival: str = "poisson"
    max_concurrency: int | None = None
    duration: float | None = None  # seconds; None: every request is sent
    at_limit: str = "wait"  # what happens to requests in flight at `duration`: wait or cut

    def __post_init__(self) -> None:
        if self.at_limit not in AT_LIMIT:
            raise ValueError(f"at_limit must be one of {', '.join(AT_LIMIT)}: {self.at_limit!r}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be positive: {self.duration}")


@dataclass(frozen=True)
class RunOutcome:
    results: list[RequestResult]  # the requests sent, in the order they were made
    duration: float
    start: float  # perf_counter() at the first arrival
    not_sent: int = 0  # prompts never sent: they arrived at or after the limit, or waited past it
    drained: int = 0  # in flight at the limit and waited for (at_limit "wait")
    ran_out: bool = False  # a duration limit was set, but the prompts ended before it

    @property
    def cut(self) -> int:
        return sum(1 for r in self.results if r.cut)


async def run_requests(
    target: Target, requests: Sequence[BenchRequest], load: Load, seed: int = 0, progress: bool = True
) -> RunOutcome:
    """Send the requests on `load`'s schedule; wait for (or cut) every one sent."""
    offsets = arrival_offsets(len(requests), load.rate, random.Random(seed), load.arrival)
    cap = load.max_concurrency
    gate: Any = asyncio.Semaphore(cap) if cap else contextlib.nullcontext()
    bar = tqdm(total=len(requests), disable=not progress, unit="req", desc=_describe(load))
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    async with httpx.AsyncClient(timeout=httpx.Timeout(target.timeout), limits=limits) as client:
        start = time.perf_counter()
        end_at = start + (load.duration if load.duration is not None else math.inf)

        async def one(request: BenchRequest) -> RequestResult | None:
            try:
                async with gate:
                    if time.perf_counter() >= end_at:
                        return None  # waited for a slot past the limit: never sent
                    result = await _send_or_cut(client, target, request)
            except asyncio.CancelledError:
                return None  # cut while waiting for a slot: never sent
            bar.update(1)
            return result

        tasks = []
        for request, offset in zip(requests, offsets, strict=True):
            if start + offset >= end_at:
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        if load.at_limit == "cut" and tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, end_at - time.perf_counter()))
            for task in pending:
                task.cancel()
        sent = [r for r in await asyncio.gather(*tasks) if r is not None]
        duration = time.perf_counter() - start
    bar.close()
    drained = sum(1 for r in sent if not r.cut and r.start < end_at < r.start + r.latency)
    not_sent = len(requests) - len(sent)
    ran_out = load.duration is not None and not_sent == 0 and _schedule_ends_early(offsets, load)
    return RunOutcome(sent, duration, start, not_sent, drained, ran_out)


def _schedule_ends_early(offsets: Sequence[float], load: Load) -> bool:
    """True when the arrival after the last prompt (at the mean gap) would still come before the limit;
    all at once (rate inf), any limit that did not stop the sending is one the prompts ran out before."""
    if math.isinf(load.rate) or not offsets:
        return True
    return offsets[-1] + 1.0 / load.rate < (load.duration or math.inf)


async def _send_or_cut(client: httpx.AsyncClient, target: Target, request: BenchRequest) -> RequestResult:
    """`send`, or, when the run cancels it at the limit, the result marked cut (what it had so far)."""
    result = RequestResult(request.input_len, request.output_len)
    try:
        return await send(client, target, request, result)
    except asyncio.CancelledError:
        result.cut, result.success, result.error = True, False, CUT_ERROR
        result.latency = time.perf_counter() - result.start
        return result


def _describe(load: Load) -> str:
    shown = "inf" if math.isinf(load.rate) else f"{load.rate:g}/s {load.arrival}"
    text = f"rate {shown}" + (f", concurrency {load.max_concurrency}" if load.max_concurrency else "")
    return text + (f", {load.duration:g} s" if load.duration is not None else "")

"""The workload the router observes, for capacity planning: arrivals and request sizes.

    GET /pd/workload   {"window_seconds", "requests", "arrival_rate", "burstiness",
                        "input_len": {"le": [16, 32, ...], "counts": [..., above the last]},
                        "output_len": {...},
                        "samples": [[seconds ago, input tokens, output tokens], ...]}

Input tokens are the router's own estimate (exact for token-id prompts, ~4 characters a token for
text); output tokens are what the answer generated: its final `usage.completion_tokens` (a whole
answer's body, a stream's last chunk with usage), else for a stream of one choice the token ids its
events were marked with (relay.py). 0 while the answer is still running, or when it failed or said
nothing of its length: such samples count as arrivals but stay out of output_len (and the planner's
length pairs). `pdserve plan --from-router URL` resamples these pairs at the observed rate and
burstiness (the inverse squared coefficient of variation of the gaps between arrivals: 1 for Poisson).

Given a profile (`pdserve router --plan-profile FILE --plan-slo ttft=...,tpot=...`), the router also
recommends how many prefill and decode instances the observed rate needs (planning/planner.py's
per-role capacity), exported as pdserve_router_recommended_instances{role} for an autoscaler.
The recommendation is recomputed at most every RECOMMEND_EVERY_S, in a thread: a scrape never waits
for it (the gauges appear once the first one is done).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW_S = 600.0
MAX_SAMPLES = 2000
BUCKETS = tuple(2**k for k in range(4, 18))  # 16 .. 131072 tokens
RECOMMEND_EVERY_S = 30.0
MIN_SAMPLES = 10
SIMULATED_REQUESTS = 60  # per simulated run of the capacity search


@dataclass
class Sample:
    """One request: when it arrived, its prompt's tokens, and (once it has answered) its output's."""

    at: float
    input_tokens: int
    output_tokens: int = 0  # 0 until the answer says how many it generated

    def generated(self, usage: Any) -> bool:
        """Take an answer's `usage` object; False if it carries no completion_tokens."""
        count = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if type(count) is not int:
            return False
        self.output_tokens = count
        return True

    def answered(self, content: bytes) -> None:
        """A whole answer's body: its usage, parsed only when the body has one (not an error's)."""
        if b'"usage"' not in content:
            return
        try:
            answer = json.loads(content)
        except ValueError:
            return
        if isinstance(answer, dict):
            self.generated(answer.get("usage"))


class WorkloadRecorder:
    """Arrivals of the last `window` seconds (at most MAX_SAMPLES), with their sizes."""

    def __init__(self, window: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.clock = window, clock
        self.samples: deque[Sample] = deque(maxlen=MAX_SAMPLES)

    def record(self, input_tokens: int) -> Sample:
        """A request has arrived; its output length is filled in on the returned sample when known."""
        sample = Sample(self.clock(), input_tokens)
        self.samples.append(sample)
        return sample

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        while self.samples and self.samples[0].at < now - self.window:
            self.samples.popleft()
        recent = [(s.at, s.input_tokens, s.output_tokens) for s in self.samples]
        times = [t for t, _, _ in recent]
        span = (times[-1] - times[0]) if len(times) > 1 else 0.0
        return {
            "window_seconds": self.window,
            "requests": len(recent),
            "arrival_rate": (len(times) - 1) / span if span > 0 else 0.0,
            "burstiness": _burstiness(times),
            "input_len": _histogram(n for _, n, _ in recent),
            "output_len": _histogram(n for _, _, n in recent if n > 0),
            "samples": [[round(now - t, 3), n_in, n_out] for t, n_in, n_out in recent],
        }


def _burstiness(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    if len(gaps) < MIN_SAMPLES:
        return 1.0
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    return mean**2 / var if var > 0 else 1.0


def _histogram(values: Any) -> dict[str, list[int]]:
    counts = [0] * (len(BUCKETS) + 1)
    for v in values:
        counts[next((i for i, le in enumerate(BUCKETS) if v <= le), len(BUCKETS))] += 1
    return {"le": list(BUCKETS), "counts": counts}  # the last count: above the largest bound


class Recommender:
    """Prefill and decode instance counts for the observed workload, from a profile and SLOs."""

    def __init__(self, profile_path: str, slo_text: str) -> None:
        from pdserve.bench.metrics import parse_slo
        from pdserve.planning.profile import Profile

        self.profile = Profile.load(profile_path)
        self.slo = parse_slo(slo_text)
        self.counts: dict[str, int] | None = None
        self.at = -float("inf")
        self.task: asyncio.Future[dict[str, int] | None] | None = None

    def refresh(self, snapshot: dict[str, Any]) -> dict[str, int] | None:
        """The latest counts; starts recomputing them (in a thread) when they are due."""
        due = time.monotonic() - self.at >= RECOMMEND_EVERY_S and snapshot["requests"] >= MIN_SAMPLES
        if due and (self.task is None or self.task.done()):
            self.at = time.monotonic()
            self.task = asyncio.ensure_future(asyncio.to_thread(self._recommend, snapshot))
            self.task.add_done_callback(self._done)
        return self.counts

    def _done(self, task: asyncio.Future[dict[str, int] | None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.counts = task.result()

    def _recommend(self, snapshot: dict[str, Any]) -> dict[str, int] | None:
        from pdserve.planning.planner import recommend_counts
        from pdserve.planning.workload import from_router

        try:
            work = from_router(snapshot, num_requests=SIMULATED_REQUESTS)
        except ValueError:  # no rate or no sizes yet
            return self.counts
        return recommend_counts(self.profile, work, self.slo)

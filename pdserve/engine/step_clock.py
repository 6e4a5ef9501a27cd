"""StepClock: the engine's own account of where its time goes, for /metrics and the serving benchmarks.

    busy_s   the device's time on the engine's steps: on CUDA, a pair of events around each launched
             step (read once the step is collected, so nothing waits for them); on the CPU, where a
             launch computes the step, the launch's wall time
    wait_s   the host's time blocked waiting for a step's sampled tokens (the device was behind)

A server's wall time minus busy_s is what the serving path (HTTP, scheduling, detokenizing, the
engine thread's hand-offs) cost the device; wait_s says how much of the host's time was spent waiting,
so busy - wait is host work that ran while the device computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Marks = tuple[Any, Any]  # (start, end): CUDA events, or perf_counter floats on the CPU


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.busy_s = 0.0
        self.wait_s = 0.0

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start: Any) -> Marks:
        """The marks of a step whose work is all queued (on the CPU: done) since `start`."""
        if not self.cuda:
            return start, time.perf_counter()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return start, end

    def collected(self, marks: Marks | None) -> None:
        """Add a collected step's device time (its tokens are on the host, so its events are done or
        about to be: the end event follows only the step's own work on the stream)."""
        if marks is None:
            return
        start, end = marks
        if self.cuda:
            end.synchronize()
            self.busy_s += start.elapsed_time(end) / 1000.0
        else:
            self.busy_s += end - start

    def timed_wait(self, wait: Callable[[], T]) -> T:
        """wait(), its time added to wait_s."""
        t0 = time.perf_counter()
        try:
            return wait()
        finally:
            self.wait_s += time.perf_counter() - t0

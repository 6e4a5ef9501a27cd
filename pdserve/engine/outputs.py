"""What the engine hands back each step: per-request deltas, and engine-wide stats for metrics."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.request import Logprob, RequestTimes


@dataclass
class RequestOutput:
    """What one request gained in one step. Streams send deltas; the last one has `finished` set."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # stop | length | abort | error
    new_logprobs: list[Logprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


KV_TIMES_KEPT = 4096  # transfer durations kept for readers that have not seen them yet


@dataclass(frozen=True)
class TransferTimes:
    """KV transfers received and timed since start (`count`), and the latest durations (at most
    KV_TIMES_KEPT, newest last). Cumulative, so any number of readers can each take what is new to
    them (`since`) and reading takes nothing from another reader."""

    count: int = 0
    latest: tuple[float, ...] = ()

    def since(self, seen: int) -> tuple[float, ...]:
        """The durations of the transfers after the first `seen` (those still kept)."""
        new = self.count - seen
        return self.latest[-new:] if new > 0 else ()


class TransferLog:
    """The engine's running record behind TransferTimes."""

    def __init__(self) -> None:
        self.count = 0
        self.latest: deque[float] = deque(maxlen=KV_TIMES_KEPT)

    def add(self, seconds: list[float]) -> TransferTimes:
        self.count += len(seconds)
        self.latest.extend(seconds)
        return TransferTimes(self.count, tuple(self.latest))


STAGES = ("queue", "prefill", "kv_transfer", "decode")  # RequestTimes.stages' keys


@dataclass(frozen=True)
class StageTimes:
    """Requests finished since start (`count`) and the stage durations of the latest (at most
    KV_TIMES_KEPT, newest last); cumulative like TransferTimes, read with `since`."""

    count: int = 0
    latest: tuple[dict[str, float], ...] = ()

    def since(self, seen: int) -> tuple[dict[str, float], ...]:
        new = self.count - seen
        return self.latest[-new:] if new > 0 else ()


class StageLog:
    """The scheduler's running record behind StageTimes: one entry per finished request."""

    def __init__(self) -> None:
        self.count = 0
        self.latest: deque[dict[str, float]] = deque(maxlen=KV_TIMES_KEPT)

    def add(self, times: RequestTimes) -> None:
        self.count += 1
        self.latest.append(times.stages())

    def snapshot(self) -> StageTimes:
        return StageTimes(self.count, tuple(self.latest))


@dataclass
class EngineStats:
    """A snapshot for /metrics, /health and the router's load reports."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0
    num_prefill_tokens: int = 0  # tokens run through the model as prompt (not decode)
    num_steps: int = 0
    num_steps_ahead: int = 0  # decode steps launched before the previous one was collected
    device_busy_seconds: float = 0.0  # the device's time on collected steps (engine/step_clock.py)
    host_wait_seconds: float = 0.0  # the engine thread's time blocked on a step's tokens
    num_waiting_for_kv: int = 0  # decode: blocks reserved, KV on its way from a prefill instance
    tokens_in_flight: int = 0  # prompt tokens admitted or queued but not yet computed
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    kv_reused_tokens: int = 0  # decode: prompt tokens whose KV was cached here, so not received
    kv_transfer_times: TransferTimes = field(default_factory=TransferTimes)
    kv_transfers_streamed: int = 0  # prefill: transfers whose every layer left during the step
    peer_messages_dropped: dict[str, int] = field(default_factory=dict)  # since start, by reason
    request_stages: StageTimes = field(default_factory=StageTimes)  # finished requests' stage times

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

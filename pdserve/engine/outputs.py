"""What the engine hands back each step: per-request deltas, and engine-wide stats for metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.request import Logprob


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
    num_waiting_for_kv: int = 0  # decode: blocks reserved, KV on its way from a prefill instance
    tokens_in_flight: int = 0  # prompt tokens admitted or queued but not yet computed
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    kv_transfer_seconds: list[float] = field(default_factory=list)  # transfers finished since last asked
    kv_transfers_streamed: int = 0  # prefill: transfers whose every layer left during the step
    peer_messages_dropped: dict[str, int] = field(default_factory=dict)  # since start, by reason

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

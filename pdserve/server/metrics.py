"""Prometheus metrics of one server: the metric objects, a per-request tracker, and scrape-time gauges.

Every app gets its own CollectorRegistry (never the global one), so several apps can live in one
process (tests, router + instance). Latencies are measured on the asyncio side, so they include queueing.
Every series carries a `model_name` label (observability/model_label.py). Besides pdserve's own names,
the names the Kubernetes Gateway API Inference Extension's endpoint picker reads (gie.py). Figures the
engine keeps as running totals are counters here too (the older gauges stay, for existing dashboards).
Per-request stage histograms (queue, prefill, KV transfer, decode) come from the engine's record of
finished requests, so a prefill instance, which answers no HTTP request for its peers' prompts, has
them too.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve.engine.outputs import STAGES, EngineStats, RequestOutput
from pdserve.observability.model_label import labelled_registry
from pdserve.server.gie import GIEMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
# vLLM's names (vllm:request_queue_time_seconds, ...), in pdserve's namespace; kv_transfer is ours
_STAGE_HELP = {
    "queue": "Arrival in the engine to its first blocks (to compute the prompt, or to receive its KV)",
    "prefill": "Prompt computed here: first blocks to the first token (prefill instances: KV sent)",
    "kv_transfer": "Decode: blocks reserved to the prompt's KV and first token received",
    "decode": "First token to the last, of requests that ended by stop or length",
}


class ServerMetrics:
    """The metric objects of one app, registered in their own registry (`registry`); `render` adds
    the model_name label to every series."""

    def __init__(self, model_name: str = "", block_size: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.exposed = labelled_registry(self.registry, lambda: self.model_name)
        r = self.registry
        self._add_request_series(r)
        self._add_engine_gauges(r)
        self._add_kv_series(r)
        self._add_counters_and_stages(r)
        self.gie = GIEMetrics(r, block_size)

    def _add_request_series(self, r: CollectorRegistry) -> None:
        """Per-request outcomes, latencies and token counts."""
        self.requests = Counter(
            "pdserve_requests", "Requests by outcome (finish reason or error kind)", ["outcome"], registry=r
        )
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Inter-token latency after the first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.front = Histogram(
            "pdserve_request_front_seconds",
            "From a request's arrival to its prompt in the engine (parse, template, tokenize, hand-over)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds", "Arrival to last token", buckets=_E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter("pdserve_generation_tokens", "Generated tokens", registry=r)

    def _add_engine_gauges(self, r: CollectorRegistry) -> None:
        """The engine's state as of its last step."""
        self.running = Gauge("pdserve_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("pdserve_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("pdserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.kv_free = Gauge("pdserve_kv_cache_free_blocks", "Free KV blocks", registry=r)
        self.prefix_hit_rate = Gauge(
            "pdserve_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up", registry=r
        )
        self.preemptions = Gauge("pdserve_num_preemptions", "Preemptions since start", registry=r)
        self.waiting_for_kv = Gauge(
            "pdserve_num_requests_waiting_for_kv", "Decode: blocks reserved, KV on its way", registry=r
        )
        self.prefill_tokens = Gauge(
            "pdserve_prompt_tokens_computed", "Prompt tokens this instance ran through the model", registry=r
        )
        self.device_busy = Gauge(
            "pdserve_engine_device_busy_seconds",
            "The device's time on the engine's steps since start (CUDA events around each step)",
            registry=r,
        )
        self.host_wait = Gauge(
            "pdserve_engine_host_wait_seconds",
            "The engine thread's time blocked waiting for a step's tokens since start",
            registry=r,
        )
        self.steps_ahead = Gauge(
            "pdserve_num_steps_ahead",
            "Decode steps launched before the previous one was collected",
            registry=r,
        )

    def _add_kv_series(self, r: CollectorRegistry) -> None:
        """KV moved between instances, reused, and peer messages dropped."""
        self.kv_bytes = Counter(
            "pdserve_kv_transfer_bytes", "KV bytes moved between instances", ["direction"], registry=r
        )
        self.kv_seconds = Histogram(
            "pdserve_kv_transfer_seconds",
            "Decode: reserve to KV + first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_streamed = Gauge(
            "pdserve_kv_transfers_streamed",
            "Prefill: transfers sent layer by layer during the step",
            registry=r,
        )
        self.kv_reused = Counter(
            "pdserve_kv_reused_tokens",
            "Decode: prompt tokens whose KV was cached here, not received",
            registry=r,
        )
        self._kv_seen = {"sent": 0, "received": 0, "timed": 0, "reused": 0}
        self.peer_dropped = Counter(
            "pdserve_peer_messages_dropped", "KV peer messages dropped, by reason", ["reason"], registry=r
        )
        self._dropped_seen: dict[str, int] = {}

    def _add_counters_and_stages(self, r: CollectorRegistry) -> None:
        self.totals = {
            "preemptions": Counter("pdserve_preemptions", "Preemptions", registry=r),
            "prefill_tokens": Counter(
                "pdserve_prefill_tokens_computed", "Prompt tokens run through the model here", registry=r
            ),
            "prefix_queries": Counter(
                "pdserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
            ),
            "prefix_hits": Counter(
                "pdserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r
            ),
            "kv_streamed": Counter(
                "pdserve_kv_transfers_layerwise", "Prefill: transfers sent layer by layer", registry=r
            ),
        }
        self._totals_seen = dict.fromkeys(self.totals, 0)
        self.stages = {
            stage: Histogram(
                f"pdserve_request_{stage}_time_seconds", _STAGE_HELP[stage], buckets=_E2E_BUCKETS, registry=r
            )
            for stage in STAGES
        }
        self._stages_seen = 0

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def set_engine_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_free.set(stats.num_free_blocks)
        queries = stats.prefix_cache_queries
        self.prefix_hit_rate.set(stats.prefix_cache_hits / queries if queries else 0.0)
        self.preemptions.set(stats.num_preemptions)
        self.waiting_for_kv.set(stats.num_waiting_for_kv)
        self.prefill_tokens.set(stats.num_prefill_tokens)
        self.steps_ahead.set(stats.num_steps_ahead)
        self.device_busy.set(stats.device_busy_seconds)
        self.host_wait.set(stats.host_wait_seconds)
        self.kv_streamed.set(stats.kv_transfers_streamed)
        self._count_kv(stats)
        self._count_totals(stats)
        self.gie.set(stats)

    def _count_totals(self, stats: EngineStats) -> None:
        """Counters from the engine's running totals, and the stage times of requests finished since
        the last stats seen (an older snapshot, from a concurrent scrape, adds nothing)."""
        totals = {
            "preemptions": stats.num_preemptions,
            "prefill_tokens": stats.num_prefill_tokens,
            "prefix_queries": stats.prefix_cache_queries,
            "prefix_hits": stats.prefix_cache_hits,
            "kv_streamed": stats.kv_transfers_streamed,
        }
        for key, total in totals.items():
            if total > self._totals_seen[key]:
                self.totals[key].inc(total - self._totals_seen[key])
                self._totals_seen[key] = total
        finished = stats.request_stages
        for stages in finished.since(self._stages_seen):
            for stage, seconds in stages.items():
                self.stages[stage].observe(max(seconds, 0.0))
        self._stages_seen = max(self._stages_seen, finished.count)

    def _count_kv(self, stats: EngineStats) -> None:
        """Add what is new since the last stats seen. Stats are cumulative, and two scrapes may hand
        theirs in out of order: an older snapshot adds nothing."""
        seen = self._kv_seen
        for direction, total in (("sent", stats.kv_bytes_sent), ("received", stats.kv_bytes_received)):
            counter = self.kv_bytes.labels(direction=direction)  # shown (as 0) before any KV moves
            if total > seen[direction]:
                counter.inc(total - seen[direction])
                seen[direction] = total
        if stats.kv_reused_tokens > seen["reused"]:
            self.kv_reused.inc(stats.kv_reused_tokens - seen["reused"])
            seen["reused"] = stats.kv_reused_tokens
        for reason, total in stats.peer_messages_dropped.items():
            if total > self._dropped_seen.get(reason, 0):  # an older snapshot adds nothing
                self.peer_dropped.labels(reason=reason).inc(total - self._dropped_seen.get(reason, 0))
                self._dropped_seen[reason] = total
        times = stats.kv_transfer_times
        for seconds in times.since(seen["timed"]):
            self.kv_seconds.observe(seconds)
        seen["timed"] = max(seen["timed"], times.count)

    def render(self) -> bytes:
        return generate_latest(self.exposed)


class RequestTracker:
    """Times one engine request from arrival to its last output and records it once when it ends."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.done = False

    def added(self) -> None:
        """The request's prompt is in the engine: its front time (arrival to here) is recorded."""
        self.metrics.front.observe(time.monotonic() - self.arrival)

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        n = len(out.new_token_ids)
        if n:
            if self.last_token_time is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.tpot.observe((now - self.last_token_time) / n)
            self.last_token_time = now
            self.num_output_tokens += n
            self.metrics.generation_tokens.inc(n)
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        if out.finished:
            self.finish(out.finish_reason or "stop")

    def finish(self, outcome: str | None) -> None:
        """Record the request's end (idempotent); `outcome` is its finish reason or why it was cut, None
        where it is counted elsewhere (an error that becomes the HTTP answer: errors.py counts it)."""
        if self.done:
            return
        self.done = True
        if outcome is not None:
            self.metrics.count(outcome)
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        self.metrics.prompt_tokens.inc(self.num_prompt_tokens)

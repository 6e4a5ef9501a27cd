"""The router's Prometheus metrics, in a registry of its own (never the global one).

Counted here: requests routed per instance, errors by kind (client requests only: a 503 from the
router's own /health is not one), retries by reason, streams resumed (or not) after their instance
failed and the resumed part's first-token delay, time to first token and request latency as the
client sees them. Set at scrape time: per-stage queue lengths and per-instance health from the latest
load reports, the observed arrival rate and the recommended instances per role (workload.py). KV
transfer totals are summed from the instances' own /metrics
(`pdserve_kv_transfer_bytes_total`, histogram `pdserve_kv_transfer_seconds`), scraped when the router
is scraped; an instance that does not answer keeps its last totals, so the sums never go backwards.
Every KV byte leaves one instance and reaches another: only the received direction is summed, so each
byte counts once. Every series carries a `model_name` label: the model the instances report
(observability/model_label.py), "unknown" until one has. Reading Prometheus text (an instance's, or a
router's for tests and benchmarks) is `samples` / `metric_sum`, prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from pdserve.observability.model_label import labelled_registry
from pdserve.router.instances import Instance, Registry
from pdserve.router.upstream import Upstream, UpstreamError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KV_BYTES = "pdserve_kv_transfer_bytes_total"
KV_SECONDS = "pdserve_kv_transfer_seconds"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STAGES = {
    "disagg": ("prefill_waiting", "decode_waiting", "decode_waiting_for_kv", "decode_running"),
    "both": ("both_waiting", "both_running"),
}
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def samples(text: str) -> Iterator[Sample]:
    """Every sample in a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        yield from family.samples


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(
        s.value
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@dataclass
class KVTotals:
    """One instance's KV transfer totals, as of its latest scrape."""

    bytes: float = 0.0
    seconds_sum: float = 0.0
    seconds_count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    @classmethod
    def parse(cls, text: str) -> KVTotals | None:
        totals, seen = cls(), False
        for s in samples(text):
            if s.name == KV_BYTES:
                # each byte is counted by its sender and its receiver: the receiver's count only
                # (a total without a direction label counts as received)
                if s.labels.get("direction", "received") == "received":
                    totals.bytes += s.value
            elif s.name == KV_SECONDS + "_sum":
                totals.seconds_sum += s.value
            elif s.name == KV_SECONDS + "_count":
                totals.seconds_count += s.value
            elif s.name == KV_SECONDS + "_bucket":
                le = float(s.labels.get("le", "inf"))
                totals.buckets[le] = totals.buckets.get(le, 0.0) + s.value
            else:
                continue
            seen = True
        return totals if seen else None


class KVTransferCollector(Collector):
    """Re-exports the sum of the instances' KV transfer totals."""

    def __init__(self) -> None:
        self.by_instance: dict[str, KVTotals] = {}

    def collect(self) -> Iterator[Metric]:
        totals = list(self.by_instance.values())
        transferred = CounterMetricFamily(
            "pdserve_router_kv_transfer_bytes",
            "KV bytes moved between instances (received, summed over instances)",
        )
        transferred.add_metric([], sum(t.bytes for t in totals))
        yield transferred
        buckets: dict[float, float] = {}
        for t in totals:
            for le, count in t.buckets.items():
                buckets[le] = buckets.get(le, 0.0) + count
        seconds = HistogramMetricFamily(
            "pdserve_router_kv_transfer_seconds", "KV transfer time per request (sum over instances)"
        )
        ordered = [(_le_text(le), buckets[le]) for le in sorted(buckets)]
        if not ordered or ordered[-1][0] != "+Inf":
            ordered.append(("+Inf", sum(t.seconds_count for t in totals)))
        seconds.add_metric([], ordered, sum_value=sum(t.seconds_sum for t in totals))
        yield seconds


def _le_text(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)


class RouterMetrics:
    """The metric objects of one router app."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = ""
        self.exposed = labelled_registry(r, lambda: self.model_name)
        labels = ["instance", "role"]
        self.routed = Counter(
            "pdserve_router_requests_routed", "Requests sent to each instance", labels, registry=r
        )
        self.errors = Counter("pdserve_router_errors", "Request errors by kind", ["kind"], registry=r)
        self.retries = Counter(
            "pdserve_router_retries", "Requests retried, by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "pdserve_router_time_to_first_token_seconds",
            "Arrival at the router to the first content event (streams)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_router_request_seconds",
            "Arrival at the router to the answer's end",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "pdserve_router_resumes",
            "Streams whose instance failed after a token: resumed on another pair, or not (failed)",
            ["outcome"],
            registry=r,
        )
        self.resume_seconds = Histogram(
            "pdserve_router_resume_first_token_seconds",
            "A resume sent to the resumed part's first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            "pdserve_router_queue_length",
            "Requests per stage, from the latest load reports",
            ["stage"],
            registry=r,
        )
        self.healthy = Gauge("pdserve_router_instance_healthy", "1 if in the rotation", labels, registry=r)
        self.inflight = Gauge(
            "pdserve_router_instance_inflight",
            "The router's requests in flight per instance",
            labels,
            registry=r,
        )
        self.kv = KVTransferCollector()
        r.register(self.kv)
        self.arrival_rate = Gauge(
            "pdserve_router_observed_arrival_rate", "Requests a second over the workload window", registry=r
        )
        self.recommended = Gauge(
            "pdserve_router_recommended_instances",
            "Instances per role the observed workload needs (router --plan-profile; workload.py)",
            ["role"],
            registry=r,
        )

    def count_error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def count_retry(self, reason: str) -> None:
        self.retries.labels(reason=reason).inc()

    def count_routed(self, instance: Instance) -> None:
        self.routed.labels(instance=instance.url, role=instance.role).inc()

    def set_state(self, registry: Registry) -> None:
        stages = dict.fromkeys(_STAGES["both" if registry.colocated else "disagg"], 0)
        for i in registry.instances:
            self.model_name = self.model_name or i.model or ""
            self.healthy.labels(instance=i.url, role=i.role).set(1 if i.healthy else 0)
            self.inflight.labels(instance=i.url, role=i.role).set(i.inflight)
            load = i.load
            if load is None or not i.healthy:
                continue
            stages[f"{i.role}_waiting"] += load.num_waiting
            if i.role != "prefill":
                stages[f"{i.role}_running"] += load.num_running
            if i.role == "decode":
                stages["decode_waiting_for_kv"] += load.num_waiting_for_kv
        for stage, value in stages.items():
            self.queue.labels(stage=stage).set(value)

    def set_workload(self, workload: dict[str, Any], counts: dict[str, int] | None) -> None:
        self.arrival_rate.set(workload["arrival_rate"])
        for role, count in (counts or {}).items():
            self.recommended.labels(role=role).set(count)

    async def scrape_kv(self, client: Upstream, instances: list[Instance], timeout: float) -> None:
        async def one(instance: Instance) -> None:
            try:
                answer = await client.get(f"{instance.url}/metrics", timeout=timeout)
                totals = KVTotals.parse(answer.text) if answer.status_code == 200 else None
            except (UpstreamError, ValueError):
                return
            if totals is not None:
                self.kv.by_instance[instance.url] = totals

        await asyncio.gather(*(one(i) for i in instances if i.healthy))

    def render(self) -> bytes:
        return generate_latest(self.exposed)

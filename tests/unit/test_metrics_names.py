"""The metric names pdserve exports for a cluster's tools: the Gateway API Inference Extension's
(vllm:* names), the model_name label on every series (instances and router), counters for running
totals, and per-request stage histograms. The instance side is a real scrape of the shared `server`."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling import SamplingParams
from pdserve.router.instances import Registry
from pdserve.router.metrics import RouterMetrics

GIE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
COUNTERS = (
    "pdserve_preemptions",
    "pdserve_prefill_tokens_computed",
    "pdserve_prefix_cache_queries",
    "pdserve_prefix_cache_hits",
    "pdserve_kv_transfers_layerwise",
)


def _scrape(server: Any) -> dict[str, Any]:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family: Any, sample_name: str) -> float:
    return sum(s.value for s in family.samples if s.name == sample_name)


def test_instance_exports_gie_names_model_label_counters_and_stages(server: Any) -> None:
    model = httpx.get(f"{server.v1}/models", headers=server.headers, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    answer = httpx.post(f"{server.v1}/completions", json=body, headers=server.headers, timeout=120)
    assert answer.status_code == 200, answer.text
    families = _scrape(server)

    for name in GIE_GAUGES:
        assert families[name].type == "gauge", name
    assert 0.0 <= _value(families["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc") <= 1.0
    (config,) = families["vllm:cache_config_info"].samples
    assert (config.labels["block_size"], config.labels["num_gpu_blocks"]) == ("16", "512")

    for name in COUNTERS:
        assert families[name].type == "counter", name
    prompt_tokens = answer.json()["usage"]["prompt_tokens"]
    assert _value(families["pdserve_prefill_tokens_computed"], "pdserve_prefill_tokens_computed_total") >= (
        prompt_tokens
    )
    queries = _value(families["pdserve_prefix_cache_queries"], "pdserve_prefix_cache_queries_total")
    assert queries >= prompt_tokens

    for stage in ("queue", "prefill", "decode"):  # a colocated instance: no KV arrives
        name = f"pdserve_request_{stage}_time_seconds"
        assert families[name].type == "histogram"
        assert _value(families[name], name + "_count") >= 1, stage
    kv = "pdserve_request_kv_transfer_time_seconds"
    assert _value(families[kv], kv + "_count") == 0

    samples = [s for f in families.values() for s in f.samples]
    assert samples and all(s.labels.get("model_name") == model for s in samples)


def test_router_series_carry_the_model_its_instances_report() -> None:
    metrics = RouterMetrics()
    registry = Registry.build(("http://127.0.0.1:1",), ("http://127.0.0.1:2",), ())
    metrics.set_state(registry)  # no instance has answered yet
    first = list(text_string_to_metric_families(metrics.render().decode()))
    assert {s.labels["model_name"] for f in first for s in f.samples} == {"unknown"}
    for instance in registry.instances:
        instance.model = "SmolLM2-135M-Instruct"
    metrics.count_error("instance_failed")
    metrics.set_state(registry)
    families = list(text_string_to_metric_families(metrics.render().decode()))
    samples = [s for f in families for s in f.samples]
    assert len(samples) > 20
    assert {s.labels.get("model_name") for s in samples} == {"SmolLM2-135M-Instruct"}


def _request() -> Request:
    return Request("r", [1, 2, 3], SamplingParams(max_tokens=4))


def test_stage_times_follow_the_status_changes() -> None:
    colocated = _request()
    colocated.status = RequestStatus.RUNNING
    colocated.append_token(5)
    colocated.status = RequestStatus.FINISHED_LENGTH
    assert set(colocated.times.stages()) == {"queue", "prefill", "decode"}

    decode = _request()
    decode.status = RequestStatus.WAITING_FOR_KV
    decode.status = RequestStatus.RUNNING  # the KV and the first token arrived
    decode.append_token(5)
    decode.status = RequestStatus.FINISHED_STOPPED
    stages = decode.times.stages()
    assert set(stages) == {"queue", "kv_transfer", "decode"} and min(stages.values()) >= 0

    for_peer = _request()  # a prefill instance's request: KV sent, no token of its own
    for_peer.status = RequestStatus.RUNNING
    for_peer.status = RequestStatus.FINISHED_STOPPED
    assert set(for_peer.times.stages()) == {"queue", "prefill"}

    aborted = _request()
    aborted.status = RequestStatus.RUNNING
    aborted.status = RequestStatus.FINISHED_ABORTED
    assert set(aborted.times.stages()) == {"queue"}
    never_scheduled = _request()
    never_scheduled.status = RequestStatus.FINISHED_ABORTED
    assert never_scheduled.times.stages() == {}

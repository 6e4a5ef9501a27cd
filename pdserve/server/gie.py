"""The metric names the Kubernetes Gateway API Inference Extension (GIE) reads from a model server.

Its model-server protocol (docs/proposals/003-model-server-protocol, as of GIE v1.x) asks for
TotalQueuedRequests, TotalRunningRequests and KVCacheUtilization as gauges, and optionally BlockSize and
NumGPUBlocks; its endpoint picker reads vLLM's names unless a pod is labelled with another engine type,
so they are exported under vLLM's names, as vLLM does:

    vllm:num_requests_waiting     TotalQueuedRequests   (waiting for blocks; decode: + waiting for KV)
    vllm:num_requests_running     TotalRunningRequests
    vllm:kv_cache_usage_perc      KVCacheUtilization    (a fraction in [0, 1], as vLLM's)
    vllm:cache_config_info        labels block_size, num_gpu_blocks (value 1)

Not exported: vllm:lora_requests_info (pdserve serves no LoRA adapters, and the picker treats a
server without it as having none).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from pdserve.engine.outputs import EngineStats


class GIEMetrics:
    """The GIE protocol's gauges, set from each EngineStats."""

    def __init__(self, registry: CollectorRegistry, block_size: int) -> None:
        r = registry
        self.block_size = block_size
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests queued (GIE TotalQueuedRequests)", registry=r
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Requests being served (GIE TotalRunningRequests)", registry=r
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV cache use, 0 to 1 (GIE KVCacheUtilization)", registry=r
        )
        self._config_set = False
        self.cache_config = Gauge(
            "vllm:cache_config_info",
            "KV cache layout (GIE BlockSize, NumGPUBlocks)",
            ["block_size", "num_gpu_blocks"],
            registry=r,
        )

    def set(self, stats: EngineStats) -> None:
        self.waiting.set(stats.num_waiting + stats.num_waiting_for_kv)
        self.running.set(stats.num_running)
        self.kv_usage.set(stats.kv_usage)
        if stats.num_blocks and not self._config_set:
            labels = {"block_size": str(self.block_size), "num_gpu_blocks": str(stats.num_blocks)}
            self.cache_config.labels(**labels).set(1)
            self._config_set = True

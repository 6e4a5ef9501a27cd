"""Configuration as a chain of frozen dataclasses; each process gets its own copy via `replace`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.cluster_secret import ClusterSecret
from pdserve.http_edge.limits import DEFAULT_MAX_CHAT_MESSAGES, DEFAULT_MAX_REQUEST_BYTES
from pdserve.kernels.config import KernelConfig

# layers/quant.py: weight-only int8 / int4, fp8 weights and activations
QUANTIZATIONS = ("wint8", "wint4", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")  # the KV pool's element type (engine/model_runner.py kv_dtype)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how: a local HF directory (or .gguf file), dtype and device."""

    path: str = ""
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    load_format: str = "auto"  # auto | dummy
    tokenizer: str | None = None  # None: the model directory's, else the default model's
    gpu_memory_utilization: float = 0.9  # CUDA: share of the GPU's memory for weights, activations and KV
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    tensor_parallel_size: int = 1  # ranks (GPUs from `device` on) that each hold a slice of the model
    quantization: str | None = None  # QUANTIZATIONS: the projections quantized at load; None: as dtype

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            choices = ", ".join(QUANTIZATIONS)
            raise ValueError(f"quantization must be one of {choices}, got {self.quantization!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and pool size (a block count, or bytes, or a default)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    share_pool: bool = False  # tensor parallel: workers hand their KV shards to rank 0 (disaggregated roles)
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES; auto: the model's dtype, fp8: e4m3 (half of bf16)
    kv_scales_file: str | None = None  # fp8 KV: per-layer scales as JSON (engine/kv_scales.py)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            choices = ", ".join(KV_CACHE_DTYPES)
            raise ValueError(f"kv_cache_dtype must be one of {choices}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, got {self.num_blocks}")


CPU_MAX_NUM_SEQS = 64
# a decode step reads the weights once for all its rows, so on a GPU twice the rows cost little more
# time and nearly double the tokens a second (figures in docs/performance.md)
CUDA_MAX_NUM_SEQS = 256


def default_max_num_seqs(device: str, given: int | None = None) -> int:
    """Sequences in one step: `given`, or when the user does not say, CUDA_MAX_NUM_SEQS on a GPU, else 64."""
    if given is not None:
        return given
    return CUDA_MAX_NUM_SEQS if device.startswith("cuda") else CPU_MAX_NUM_SEQS


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step, tokens per step, and the waiting-queue bound."""

    max_num_seqs: int = CPU_MAX_NUM_SEQS  # the CLI and LLM default by device: default_max_num_seqs
    max_num_batched_tokens: int = 2048
    max_waiting: int = 512
    # build step N's outputs (detokenize, stop strings, text) while step N+1 runs on the GPU, and in
    # a steady decode batch launch N+1 before N is collected (engine/ahead.py); a stop then costs one
    # wasted step of that request, never a wrong token. None: on CUDA only (on CPU a step runs inside
    # its launch, so overlapping would only hold each output back one step)
    overlap_outputs: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


ROLES = ("both", "prefill", "decode")
# auto: per peer, cuda_ipc (same host, GPUs) > nccl (GPUs) > tcp; nccl runs on Gloo for CPU pools
KV_TRANSPORTS = ("auto", "tcp", "cuda_ipc", "nccl", "inproc")


@dataclass(frozen=True)
class DisaggConfig:
    """This instance's role and its KV/control endpoint (used when the role is prefill or decode)."""

    role: str = "both"
    kv_transport: str = "auto"  # auto | tcp | cuda_ipc | nccl | inproc (transport/base.py)
    kv_host: str = "127.0.0.1"  # where the KV/control socket binds
    kv_port: int = 0  # 0: a free port
    kv_advertise_host: str | None = None  # the address peers use, when it differs from kv_host
    kv_transfer_timeout: float = 120.0
    peer_timeout: float = 5.0
    # prefill: send a prompt's KV layer by layer while the step computes (cuda_ipc peers only;
    # disagg/layer_stream.py). Off by default: it adds more to TTFT than copying the whole request's
    # KV once the step is done (figures in docs/performance.md)
    stream_layers: bool = False
    # authenticates the KV control and data channels and the hand-off fields (cluster_secret.py);
    # a prefill or decode instance on a network transport refuses to start without one
    cluster_secret: ClusterSecret | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(
                f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}"
            )
        for name in ("kv_transfer_timeout", "peer_timeout"):  # inf: a wait on a stuck peer never ends
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.role != "both"


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    @property
    def moves_sharded_kv(self) -> bool:
        """A tensor-parallel prefill or decode instance: rank 0 moves every rank's part of the KV."""
        return self.model.tensor_parallel_size > 1 and self.disagg.enabled


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front of one instance."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    generation_config: str = "auto"  # auto: omitted sampling fields take the model's defaults; none: OpenAI's
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body: 413, before it is read whole
    max_chat_messages: int = DEFAULT_MAX_CHAT_MESSAGES
    prompt_threads: int = 1  # request_builder.py: each with its own tokenizer copy
    metrics_public: bool = False  # /metrics without the API key
    access_log_polls: bool = False  # keep /health, /pd/info, /metrics polls in the access log
    registry: str | None = None  # redis://HOST:PORT[/DB]: registered there while serving
    registry_ttl: float = 10.0  # seconds the registry entry outlives its last refresh
    drain_timeout: float = 30.0  # SIGTERM: how long requests in flight get to finish
    # an instance that is the entry itself (server/entry.py): its peers' URLs, and a prefill entry's bound
    prefill_peers: tuple[str, ...] = ()  # on a decode instance
    decode_peers: tuple[str, ...] = ()  # on a prefill instance
    decode_max_queued: int = 5
    max_resumes: int = 2  # an entry's retries and resumes of one request (router/proxy.py)
    stall_timeout: float = 30.0  # a prefill entry's relayed stream silent this long resumes elsewhere
    otlp_traces_endpoint: str | None = None  # OTLP/HTTP collector for OpenTelemetry spans
    reasoning_parser: str | None = None  # server/parsers/reasoning.py's names
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # server/parsers/pipeline.py TOOL_CALL_PARSERS' names
    engine_process: bool = False  # the engine in its own process (engine/core_client.py), else a thread

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill_peers", tuple(self.prefill_peers))
        object.__setattr__(self, "decode_peers", tuple(self.decode_peers))
        role = self.engine.disagg.role
        if self.prefill_peers and role != "decode":
            raise ValueError(f"--prefill URL... is for a decode instance (this one is {role})")
        if self.decode_peers and role != "prefill":
            raise ValueError(f"--decode URL... is for a prefill instance (this one is {role})")
        if self.decode_max_queued < 0:
            raise ValueError("--decode-max-queued must be at least 0")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")

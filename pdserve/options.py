"""The options of one instance, declared once: `pdserve serve`'s flags, `pdserve up`'s pass-through
flags and `LLM(...)`'s keyword arguments are all read from the table below, and `engine_config` /
`server_config` turn a set of them into the frozen config chain.

    pdserve serve --max-num-seqs 128 --no-prefix-caching      (argparse: add_options)
    LLM(model, max_num_seqs=128, enable_prefix_caching=False) (offline_engine_config)

An option's name is its keyword argument and its argparse dest; a value of None leaves the config
dataclass's own default. This module knows nothing of argparse sub-commands, the server or the engine.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pdserve.cli_types import http_url, int_at_least, parse_size, positive_float
from pdserve.cluster_secret import SECRET_ENV, ClusterSecret, SecretError
from pdserve.config import (
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    ROLES,
    CacheConfig,
    DisaggConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    default_max_num_seqs,
)
from pdserve.http_edge.limits import DEFAULT_MAX_CHAT_MESSAGES, DEFAULT_MAX_REQUEST_BYTES
from pdserve.kernels.config import KernelConfig
from pdserve.registry.redis_keys import check_registry_url
from pdserve.router.instances import normalize_url
from pdserve.server.parsers.pipeline import TOOL_CALL_PARSERS
from pdserve.server.parsers.reasoning import REASONING_PARSERS

_positive = int_at_least(1)
ENGINE_PROCESS_ENV = "PDSERVE_ENGINE_PROCESS"  # --engine-process's default when neither flag is given
API_KEY_ENV = "PDSERVE_API_KEY"  # read when --api-key is not given (how `pdserve up` passes it)
MODEL_GROUP = "model and device"
DISAGG_GROUP = "disaggregation"
ENTRY_GROUP = "serving clients without a router (the instance is the entry)"


def cluster_secret_file(path: str) -> ClusterSecret:
    """An argparse type: the secret in the file at `path`."""
    try:
        return ClusterSecret.from_file(path)
    except SecretError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def registry_url(text: str) -> str:
    """An argparse type: a redis:// registry URL."""
    try:
        return check_registry_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def peer_url(text: str) -> str:
    """An argparse type: a peer instance's http(s) URL (host:port reads as http://host:port)."""
    try:
        return normalize_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kernel_spec(text: str) -> KernelConfig:
    """An argparse type: `--kernels pdl=off,split_norm=off` over the defaults."""
    try:
        return KernelConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Option:
    """One option: its keyword name, its flags and help, and the config field it sets."""

    name: str  # the LLM keyword and the argparse dest
    flags: tuple[str, ...]
    section: str  # the config it belongs to: model | cache | scheduler | disagg | kernels | server
    field: str = ""  # that config's field, when its name differs
    default: Any = None
    help: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flag: bool = False  # takes no value: given, it sets `const`
    const: Any = None
    off_flags: tuple[str, ...] = ()  # a flag's opposites: given, they set `not const`
    group: str | None = None  # the argparse group it is listed under
    offline: bool = True  # an LLM keyword too (the server's and the KV endpoint's are not)
    nargs: str | None = None  # "+": one or more values (a list)

    @property
    def config_field(self) -> str:
        return self.field or self.name


MODEL_HELP = "HF directory, .gguf file, or a shape in pdserve/model_configs (default: SmolLM2-135M-Instruct)"

OPTIONS: tuple[Option, ...] = (
    Option("model", ("--model",), "model", "path", help=MODEL_HELP),
    Option("host", ("--host",), "server", default="127.0.0.1", help="the HTTP address", offline=False),
    Option("port", ("--port",), "server", default=8000, type=int, help="the HTTP port", offline=False),
    Option(
        "api_key",
        ("--api-key",),
        "server",
        help=f"require Authorization: Bearer KEY on every route but /health (default: ${API_KEY_ENV}, "
        "else none)",
        offline=False,
    ),
    Option(
        "served_model_name",
        ("--served-model-name",),
        "server",
        help="the model name clients use (default: dir name)",
        offline=False,
    ),
    Option(
        "generation_config",
        ("--generation-config",),
        "server",
        default="auto",
        choices=("auto", "none"),
        help="auto: a request's omitted temperature/top_p/top_k/min_p/repetition_penalty take the model's "
        "generation_config.json values; none: OpenAI's defaults",
        offline=False,
    ),
    Option(
        "max_num_seqs",
        ("--max-num-seqs",),
        "scheduler",
        type=_positive,
        help="sequences in one step (default: 256 on CUDA, 64 on CPU)",
    ),
    Option(
        "max_num_batched_tokens",
        ("--max-num-batched-tokens",),
        "scheduler",
        default=2048,
        type=_positive,
        help="prompt and decode tokens in one step (longer prompts are prefilled in chunks)",
    ),
    Option(
        "max_waiting",
        ("--max-waiting",),
        "scheduler",
        default=512,
        type=_positive,
        help="waiting-queue bound; beyond it: 503",
    ),
    Option(
        "overlap_outputs",
        ("--no-overlap-outputs",),
        "scheduler",
        flag=True,
        const=False,
        help="wait for each step before building its outputs or launching the next (CUDA default: overlap)",
    ),
    Option("block_size", ("--block-size",), "cache", default=16, type=_positive, help="tokens per KV block"),
    Option(
        "num_blocks",
        ("--num-blocks",),
        "cache",
        type=_positive,
        help="KV pool size in blocks (default: from --kv-cache-memory)",
    ),
    Option(
        "kv_cache_memory",
        ("--kv-cache-memory",),
        "cache",
        "kv_cache_memory_bytes",
        type=parse_size,
        help="KV pool size in bytes, e.g. 2GiB (default: CUDA, what --gpu-memory-utilization leaves; "
        "CPU, the weights' size within [one --max-model-len sequence, 1GiB])",
    ),
    Option(
        "device",
        ("--device",),
        "model",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when a GPU is visible, else cpu",
        group=MODEL_GROUP,
    ),
    Option(
        "dtype",
        ("--dtype",),
        "model",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and KV; auto: bfloat16 on CUDA, float32 on CPU",
        group=MODEL_GROUP,
    ),
    Option(
        "max_model_len",
        ("--max-model-len",),
        "model",
        type=_positive,
        help="prompt + output tokens of one request at most (default: the model's max_position_embeddings)",
        group=MODEL_GROUP,
    ),
    Option(
        "load_format",
        ("--load-format",),
        "model",
        default="auto",
        choices=("auto", "dummy"),
        help="dummy: random weights from config.json (time large shapes without a checkpoint)",
        group=MODEL_GROUP,
    ),
    Option(
        "quantization",
        ("--quantization",),
        "model",
        choices=QUANTIZATIONS,
        help="quantize the layers' projections at load: wint8 (int8 weights, a scale per output channel), "
        "wint4 (int4 weights, a scale per 128 inputs), fp8 (e4m3 weights per channel, activations per "
        "token); both roles of a disaggregated pair must use the same",
        group=MODEL_GROUP,
    ),
    Option(
        "kv_cache_dtype",
        ("--kv-cache-dtype",),
        "cache",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="the KV cache's element type: auto (the model's dtype) or fp8 (e4m3: half of bf16's bytes, "
        "twice the tokens in the same memory); both roles of a disaggregated pair must use the same",
        group=MODEL_GROUP,
    ),
    Option(
        "kv_scales_file",
        ("--kv-scales-file",),
        "cache",
        metavar="PATH",
        help='with --kv-cache-dtype fp8: the per-layer scales, JSON {"k_scale": [...], "v_scale": [...]} '
        "(default: the checkpoint's k_scale / v_scale, else calibrated at load on a fixed text)",
        group=MODEL_GROUP,
    ),
    Option(
        "tokenizer",
        ("--tokenizer",),
        "model",
        help="tokenizer directory (default: the model's)",
        group=MODEL_GROUP,
    ),
    Option(
        "gpu_memory_utilization",
        ("--gpu-memory-utilization",),
        "model",
        default=0.9,
        type=float,
        help="CUDA: share of GPU memory for weights, activations and the KV pool",
        group=MODEL_GROUP,
    ),
    Option(
        "enforce_eager",
        ("--enforce-eager",),
        "model",
        default=False,
        flag=True,
        const=True,
        help="CUDA: no CUDA graphs for decode",
        group=MODEL_GROUP,
    ),
    Option(
        "tensor_parallel_size",
        ("--tp", "--tensor-parallel-size"),
        "model",
        default=1,
        type=_positive,
        help="tensor parallelism: ranks (GPUs cuda:0..N-1, or CPU processes) that share the model",
        group=MODEL_GROUP,
    ),
    Option(
        "kernels",
        ("--kernels",),
        "kernels",
        type=kernel_spec,
        metavar="SPEC",
        help="kernel choices as name=value,..., e.g. pdl=off,split_norm=off "
        "(the fields of KernelConfig, pdserve/kernels/config.py)",
        group=MODEL_GROUP,
    ),
    Option(
        "enable_prefix_caching",
        ("--no-prefix-caching",),
        "cache",
        default=True,
        flag=True,
        const=False,
        help="do not reuse the KV of a prompt prefix computed before",
    ),
    Option(
        "seed",
        ("--seed",),
        "model",
        default=0,
        type=int,
        help="the engine's random seed: sampling without a request seed, dummy weights",
    ),
    Option(
        "role",
        ("--role",),
        "disagg",
        default="both",
        choices=ROLES,
        help="prefill, decode, or both (colocated)",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "kv_transport",
        ("--kv-transport",),
        "disagg",
        default="auto",
        choices=("auto", "tcp", "cuda_ipc", "nccl"),
        help="how KV moves to decode instances: auto picks per peer, cuda_ipc (same host, GPUs), "
        "then nccl (GPUs), else tcp; nccl uses Gloo for CPU pools",
        group=DISAGG_GROUP,
    ),
    Option(
        "kv_stream_layers",
        ("--kv-stream-layers",),
        "disagg",
        "stream_layers",
        default=False,
        flag=True,
        const=True,
        help="prefill: send KV to cuda_ipc peers layer by layer while the step computes (experimental)",
        group=DISAGG_GROUP,
    ),
    Option(
        "kv_host",
        ("--kv-host",),
        "disagg",
        help="where the KV/control socket binds (default: --host)",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "kv_port",
        ("--kv-port",),
        "disagg",
        default=0,
        type=int,
        help="KV control port (data uses the next one); 0: free ports, picked at start",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "kv_advertise_host",
        ("--kv-advertise-host",),
        "disagg",
        help="the host peers use to reach this instance",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "kv_transfer_timeout",
        ("--kv-transfer-timeout",),
        "disagg",
        default=120.0,
        type=float,
        help="seconds before a transfer fails",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "cluster_secret",
        ("--cluster-secret-file",),
        "disagg",
        type=cluster_secret_file,
        metavar="FILE",
        help=f"the secret this cluster's router and instances share (KV channels, hand-offs) "
        f"(default: ${SECRET_ENV}; pdserve up makes one)",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "max_request_bytes",
        ("--max-request-bytes",),
        "server",
        default=DEFAULT_MAX_REQUEST_BYTES,
        type=parse_size,
        metavar="SIZE",
        help="a larger request body is answered 413 before it is read, e.g. 16MiB (default: 4MiB)",
        offline=False,
    ),
    Option(
        "max_chat_messages",
        ("--max-chat-messages",),
        "server",
        default=DEFAULT_MAX_CHAT_MESSAGES,
        type=_positive,
        help="messages in one chat request at most; more: 400",
        offline=False,
    ),
    Option(
        "prompt_threads",
        ("--prompt-threads",),
        "server",
        default=1,
        type=_positive,
        help="threads that parse, template and tokenize requests, each with its own copy of the "
        "tokenizer (which releases the GIL while it encodes)",
        offline=False,
    ),
    Option(
        "reasoning_parser",
        ("--reasoning-parser",),
        "server",
        choices=REASONING_PARSERS,
        help="chat answers' <think>...</think> text goes to reasoning_content (qwen3: answers that open "
        "with <think>, Qwen3; deepseek_r1: answers that open inside the block, QwQ, DeepSeek-R1, "
        "Qwen3-*-Thinking-2507)",
        offline=False,
    ),
    Option(
        "enable_auto_tool_choice",
        ("--enable-auto-tool-choice",),
        "server",
        default=False,
        flag=True,
        const=True,
        help="tool_choice auto: the answer's tool calls (--tool-call-parser's format) become tool_calls",
        offline=False,
    ),
    Option(
        "tool_call_parser",
        ("--tool-call-parser",),
        "server",
        choices=tuple(TOOL_CALL_PARSERS),
        help="the tool-call format the model writes: hermes (Qwen2.5, Qwen3, QwQ), llama3_json (Llama 3.x)",
        offline=False,
    ),
    Option(
        "metrics_public",
        ("--metrics-public",),
        "server",
        default=False,
        flag=True,
        const=True,
        help="serve /metrics without the API key (for a Prometheus scraper without it)",
        offline=False,
    ),
    Option(
        "access_log_polls",
        ("--access-log-polls",),
        "server",
        default=False,
        flag=True,
        const=True,
        help="keep successful GET /health, /pd/info and /metrics polls in the access log",
        offline=False,
    ),
    Option(
        "engine_process",
        ("--engine-process",),
        "server",
        default=None,
        flag=True,
        const=True,
        off_flags=("--no-engine-process",),
        help="run the engine in its own process, so that HTTP work never holds up its steps; "
        f"--no-engine-process: on a thread of the server's (default: ${ENGINE_PROCESS_ENV}=1 or 0, "
        "else its own process on CUDA and a thread on the CPU)",
        offline=False,
    ),
    Option(
        "drain_timeout",
        ("--drain-timeout",),
        "server",
        default=30.0,
        type=positive_float,
        metavar="SECONDS",
        help="on SIGTERM: /health 503, new requests 503, those in flight get this long to finish, "
        "then the rest are ended (a stream with an instance_draining error event) and it exits 0",
        offline=False,
    ),
    Option(
        "registry",
        ("--registry",),
        "server",
        type=registry_url,
        metavar="URL",
        help="redis://HOST:PORT[/DB]: register this instance there while it serves (routers find it)",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "registry_ttl",
        ("--registry-ttl",),
        "server",
        default=10.0,
        type=positive_float,
        metavar="SECONDS",
        help="the registry entry expires this long after the last refresh (refreshed every third of it)",
        group=DISAGG_GROUP,
        offline=False,
    ),
    Option(
        "decode_peers",
        ("--decode",),
        "server",
        type=peer_url,
        nargs="+",
        metavar="URL",
        help="on a prefill instance: the decode instances it hands client requests to, so that clients "
        "may call it directly (BladeLLM's way)",
        group=ENTRY_GROUP,
        offline=False,
    ),
    Option(
        "prefill_peers",
        ("--prefill",),
        "server",
        type=peer_url,
        nargs="+",
        metavar="URL",
        help="on a decode instance: the prefill instances it asks for client requests' prompts, so that "
        "clients may call it directly (FastDeploy's way)",
        group=ENTRY_GROUP,
        offline=False,
    ),
    Option(
        "decode_max_queued",
        ("--decode-max-queued",),
        "server",
        default=5,
        type=int_at_least(0),
        help="on a prefill instance with --decode: a decode instance with more requests waiting is not "
        "chosen; none under it: 503",
        group=ENTRY_GROUP,
        offline=False,
    ),
    Option(
        "max_resumes",
        ("--max-resumes",),
        "server",
        default=2,
        type=int_at_least(0),
        help="on an entry instance: retries and resumes of one request elsewhere after a peer failed it",
        group=ENTRY_GROUP,
        offline=False,
    ),
    Option(
        "stall_timeout",
        ("--stall-timeout",),
        "server",
        default=30.0,
        type=positive_float,
        metavar="SECONDS",
        help="on a prefill instance with --decode: a relayed stream silent this long after a token is "
        "resumed on another decode instance",
        group=ENTRY_GROUP,
        offline=False,
    ),
    Option(
        "otlp_traces_endpoint",
        ("--otlp-traces-endpoint",),
        "server",
        type=http_url,
        metavar="URL",
        help="send OpenTelemetry spans to this OTLP/HTTP endpoint, e.g. http://collector:4318/v1/traces",
        offline=False,
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}
# LLM runs in this process, with no HTTP queue in front: a CPU default and no waiting-queue bound
OFFLINE_DEFAULTS: dict[str, Any] = {"device": "cpu", "max_waiting": 1 << 30, "kv_transport": "inproc"}


def _names_default(text: str) -> bool:
    return "default:" in text or "(default" in text


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with "(default: X)", unless its text already says its default or there
    is nothing to show: no default (None: the text says what happens), or a flag (it sets a constant)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if not action.option_strings or action.nargs == 0 or _names_default(text):
            return text
        if default is None or default is argparse.SUPPRESS or default == []:
            return text
        return f"{text} (default: %(default)s)"


def help_with_default(option: Option) -> str:
    """An option's help with its default spelled out (for `up`, which passes the option on as given)."""
    text = option.help or ""
    if option.flag or option.default is None or _names_default(text):
        return text
    return f"{text} (default: {option.default})".replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option] = OPTIONS) -> None:
    """Add each option's flag to `parser` (in its group, if it has one)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options:
        target: Any = parser
        if option.group is not None:
            if option.group not in groups:
                groups[option.group] = parser.add_argument_group(option.group)
            target = groups[option.group]
        if option.flag:
            target.add_argument(
                *option.flags,
                dest=option.name,
                action="store_const",
                const=option.const,
                default=option.default,
                help=option.help,
            )
            for off in option.off_flags:
                help_off = f"the opposite of {option.flags[0]}"
                target.add_argument(
                    off, dest=option.name, action="store_const", const=not option.const, help=help_off
                )
            continue
        extra: dict[str, Any] = {"choices": list(option.choices)} if option.choices else {}
        if option.metavar:
            extra["metavar"] = option.metavar
        if option.nargs:
            extra["nargs"] = option.nargs
        target.add_argument(
            *option.flags,
            dest=option.name,
            type=option.type,
            default=option.default,
            help=option.help,
            **extra,
        )


def resolve_device(device: str) -> str:
    """'auto': cuda when a GPU is visible, else cpu; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _values(options: dict[str, Any], sections: Iterable[str]) -> dict[str, Any]:
    """Every option of `sections`: the given value, else the table's default; an unknown name fails."""
    names = {o.name for o in OPTIONS if o.section in sections}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    return {name: options.get(name, BY_NAME[name].default) for name in names}


def _fields(values: dict[str, Any], section: str) -> dict[str, Any]:
    """The given (not None) values of one config, by that config's field names."""
    return {
        o.config_field: values[o.name]
        for o in OPTIONS
        if o.section == section and values.get(o.name) is not None
    }


def engine_config(**options: Any) -> EngineConfig:
    """The EngineConfig of these options (names from OPTIONS; omitted ones take the table's default)."""
    values = _values(options, ("model", "cache", "scheduler", "disagg", "kernels"))
    values["device"] = resolve_device(values["device"])
    values["max_num_seqs"] = default_max_num_seqs(values["device"], values["max_num_seqs"])
    kernels = values["kernels"]
    return EngineConfig(
        model=ModelConfig(**_fields(values, "model")),
        cache=CacheConfig(**_fields(values, "cache")),
        scheduler=SchedulerConfig(**_fields(values, "scheduler")),
        disagg=DisaggConfig(**_fields(values, "disagg")),
        kernels=KernelConfig.parse(kernels) if isinstance(kernels, str) else kernels or KernelConfig(),
    )


def server_config(**options: Any) -> ServerConfig:
    """One instance's ServerConfig: the server's options, and the engine's from the rest."""
    server_names = {o.name for o in OPTIONS if o.section == "server"}
    server = _values({k: v for k, v in options.items() if k in server_names}, ("server",))
    engine = {k: v for k, v in options.items() if k not in server_names}
    if engine.get("kv_host") is None:  # the KV socket binds where the HTTP server does, unless told
        engine["kv_host"] = server["host"]
    config = engine_config(**engine)
    if server["engine_process"] is None:
        server["engine_process"] = default_engine_process(config.model.device)
    return ServerConfig(**_fields(server, "server"), engine=config)


def default_engine_process(device: str) -> bool:
    """$PDSERVE_ENGINE_PROCESS if set, else a process of its own on a GPU (where the engine's steps
    must never wait for HTTP work: 256 streams of a 7B on one H100 ran 24% faster) and a thread on
    the CPU (where the two processes share the cores the model computes on: 22% slower there)."""
    given = os.environ.get(ENGINE_PROCESS_ENV)
    if given is not None and given != "":
        return given != "0"
    return device.startswith("cuda")


def offline_engine_config(**options: Any) -> EngineConfig:
    """The EngineConfig of `LLM(...)`'s options: only offline ones, OFFLINE_DEFAULTS over the table's."""
    refused = sorted(name for name in options if name in BY_NAME and not BY_NAME[name].offline)
    if refused:
        raise TypeError(f"LLM() takes no option(s) {', '.join(refused)} (pdserve serve does)")
    return engine_config(**{**OFFLINE_DEFAULTS, **options})

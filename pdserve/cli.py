"""The `pdserve` command: `serve` one instance, `prepare` the model; `router`, `up` and `bench` are
added from their own modules.

Every option has a default, so a bare `pdserve serve` serves the default model on 127.0.0.1:8000.
Heavy imports (torch, transformers, the server) happen inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from pdserve.cli_types import int_at_least
from pdserve.config import (
    ROLES,
    CacheConfig,
    DisaggConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    default_max_num_seqs,
)

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '1e9' -> 1000000000, '4096' -> 4096."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB, 512MiB or a byte count)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


_positive = int_at_least(1)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve one instance over an OpenAI-compatible HTTP API")
    s.add_argument(
        "--model",
        default=None,
        help="HF directory, .gguf file, or a shape in pdserve/model_configs (default: SmolLM2-135M-Instruct)",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: dir name)")
    s.add_argument(
        "--generation-config",
        choices=["auto", "none"],
        default="auto",
        help="auto: a request's omitted temperature/top_p/top_k/min_p/repetition_penalty take the model's "
        "generation_config.json values; none: OpenAI's defaults",
    )
    s.add_argument(
        "--max-num-seqs",
        type=_positive,
        default=None,
        help="sequences in one step (default: 256 on CUDA, 64 on CPU)",
    )
    s.add_argument("--max-num-batched-tokens", type=_positive, default=2048)
    s.add_argument("--max-waiting", type=_positive, default=512, help="waiting-queue bound; beyond it: 503")
    s.add_argument(
        "--no-overlap-outputs",
        action="store_true",
        help="wait for each step before building its outputs or launching the next (CUDA default: overlap)",
    )
    s.add_argument("--block-size", type=_positive, default=16)
    s.add_argument("--num-blocks", type=_positive, default=None, help="KV pool size in blocks")
    s.add_argument(
        "--kv-cache-memory", type=parse_size, default=None, help="KV pool size in bytes, e.g. 2GiB"
    )
    _add_model_args(s)
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    _add_disagg_args(s)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)


def _add_model_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("model and device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    g.add_argument("--max-model-len", type=_positive, default=None)
    g.add_argument(
        "--load-format",
        choices=["auto", "dummy"],
        default="auto",
        help="dummy: random weights from config.json (time large shapes without a checkpoint)",
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: share of GPU memory for weights, activations and the KV pool",
    )
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for decode")
    g.add_argument(
        "--tp",
        "--tensor-parallel-size",
        dest="tensor_parallel_size",
        type=_positive,
        default=1,
        help="tensor parallelism: ranks (GPUs cuda:0..N-1, or CPU processes) that share the model",
    )


def _add_disagg_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("disaggregation")
    g.add_argument("--role", choices=list(ROLES), default="both", help="prefill, decode, or both (colocated)")
    g.add_argument(
        "--kv-transport",
        choices=["auto", "tcp", "cuda_ipc", "nccl"],
        default="auto",
        help="how KV moves to decode instances: auto picks per peer, cuda_ipc (same host, GPUs), "
        "then nccl (GPUs), else tcp; nccl uses Gloo for CPU pools",
    )
    g.add_argument(
        "--kv-stream-layers",
        action="store_true",
        help="prefill: send KV to cuda_ipc peers layer by layer while the step computes (experimental)",
    )
    g.add_argument("--kv-host", default=None, help="where the KV/control socket binds (default: --host)")
    g.add_argument(
        "--kv-port", type=int, default=0, help="KV control port (data uses the next one); 0: free ports"
    )
    g.add_argument("--kv-advertise-host", default=None, help="the host peers use to reach this instance")
    g.add_argument("--kv-transfer-timeout", type=float, default=120.0, help="seconds before a transfer fails")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("prepare", help="locate or convert the model once; print its directory")
    s.add_argument(
        "--model",
        default=None,
        help="HF directory, .gguf file, or a shape in pdserve/model_configs (default: SmolLM2-135M-Instruct)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="prefill/decode disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_prepare(sub)
    from pdserve.bench.cli import add_bench_parser
    from pdserve.launcher import add_up_parser
    from pdserve.router.cli_commands import add_router_parser

    add_router_parser(sub)
    add_up_parser(sub)
    add_bench_parser(sub)
    return parser


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The frozen config chain of one instance, from `serve`'s arguments."""
    from pdserve.models.prepare import resolve_model

    model = ModelConfig(
        path=resolve_model(args.model),
        dtype=args.dtype,
        device=_resolve_device(args.device),
        max_model_len=args.max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        tokenizer=args.tokenizer,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    cache = CacheConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    scheduler = SchedulerConfig(
        max_num_seqs=default_max_num_seqs(model.device, args.max_num_seqs),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting,
        overlap_outputs=False if args.no_overlap_outputs else None,
    )
    disagg = DisaggConfig(
        role=args.role,
        kv_transport=args.kv_transport,
        kv_host=args.kv_host or args.host,
        kv_port=args.kv_port,
        kv_advertise_host=args.kv_advertise_host,
        kv_transfer_timeout=args.kv_transfer_timeout,
        stream_layers=args.kv_stream_layers,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        generation_config=args.generation_config,
        engine=EngineConfig(model=model, cache=cache, scheduler=scheduler, disagg=disagg),
    )


def _serve(args: argparse.Namespace) -> int:
    from pdserve.server.openai_api import run_server

    try:
        config = server_config(args)
    except (FileNotFoundError, ValueError) as e:
        logging.getLogger("pdserve").error("%s", e)
        return 2
    run_server(config)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pdserve.models.prepare import resolve_model

    try:
        print(resolve_model(args.model))
    except FileNotFoundError as e:
        logging.getLogger("pdserve").error("%s", e)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())

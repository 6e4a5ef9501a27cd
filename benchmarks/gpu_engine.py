"""GPU engine speed against the hardware's measured limits (issue: GPU).

First the ceilings, measured in the same run: bf16 matmul TFLOP/s and device copy GB/s (bytes read +
written per second). Then, per model shape (dummy weights, bf16):

- decode step at batch 1, 32, 128 with a 1k-token context per sequence: time of one step (CUDA graphs
  unless --eager) vs the memory-bandwidth bound = (weight bytes + KV bytes read) / copy bandwidth,
  each step waited for, and launched behind the one before with its ids on the device (as the engine
  runs a steady decode batch: host preparation overlaps the GPU);
- prefill of 1100-token prompts filling the token budget: achieved TFLOP/s (2 x non-embedding params x
  tokens, plus causal attention) vs the matmul ceiling.

    python benchmarks/gpu_engine.py --shapes qwen2.5-7b,qwen2.5-32b --output results.json
    python benchmarks/gpu_engine.py --kernels pdl=off ...   # one side of an A/B (KernelConfig.parse)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from typing import Any

import torch
from common import timed  # benchmarks/ is sys.path[0]
from transformers import AutoConfig

from pdserve.config import CacheConfig, ModelConfig, SchedulerConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import ScheduledChunk
from pdserve.kernels.config import KernelConfig
from pdserve.models.prepare import resolve_model


def ceilings() -> dict[str, float]:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = timed(lambda: a @ b, 20)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    c = timed(lambda: dst.copy_(src), 20)
    out = {"matmul_tflops": 2 * 8192**3 / t / 1e12, "copy_gbps": 2 * src.numel() / c / 1e9}
    if torch.cuda.device_count() > 1:
        peer = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:1")
        g = timed(lambda: peer.copy_(src[: 1 << 30]), 20)
        out["gpu_to_gpu_gbps"] = peer.numel() / g / 1e9
    return out


def make_runner(
    shape: str, num_blocks: int, max_seqs: int, budget: int, eager: bool, kernels: KernelConfig
) -> ModelRunner:
    path = resolve_model(shape)
    model = ModelConfig(path=path, device="cuda", load_format="dummy", enforce_eager=eager)
    return ModelRunner(
        model,
        CacheConfig(num_blocks=num_blocks, enable_prefix_caching=False),
        AutoConfig.from_pretrained(path),
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        kernels=kernels,
    )


def fake_requests(n: int, context: int, block_size: int, first_block: int = 0) -> list[Request]:
    reqs = []
    per = -(-(context + 1) // block_size)
    for i in range(n):
        r = Request(f"r{i}", [1 + (i + j) % 1000 for j in range(context)], SamplingParams(max_tokens=4))
        r.block_ids = list(range(first_block + i * per, first_block + (i + 1) * per))
        reqs.append(r)
    return reqs


def bench_decode(runner: ModelRunner, batch: int, context: int) -> float:
    reqs = fake_requests(batch, context, runner.layout.block_size)
    for r in reqs:
        r.token_ids.append(7)
        r.num_computed_tokens = context  # the last token is this step's query
    chunks = [ScheduledChunk(r, 1) for r in reqs]
    return timed(lambda: runner.execute(chunks), 20)


def bench_decode_pipelined(runner: ModelRunner, batch: int, context: int, steps: int = 20) -> float:
    """Seconds per decode step when each step is launched behind the one before, taking its sampled ids
    on the device (what Engine does in a steady decode batch, engine/ahead.py): the host's work for
    step k+1 overlaps step k on the GPU. Same requests and positions every step."""
    reqs = fake_requests(batch, context, runner.layout.block_size)
    for r in reqs:
        r.token_ids.append(7)
        r.num_computed_tokens = context
    chunks = [ScheduledChunk(r, 1) for r in reqs]
    pending = runner.launch(chunks)
    for _ in range(3):  # warm-up, ahead
        pending.wait()
        pending = runner.launch(chunks, ahead=pending.token_ids)
    pending.wait()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    pending = runner.launch(chunks)
    for _ in range(steps - 1):
        following = runner.launch(chunks, ahead=pending.token_ids)
        pending.wait()
        pending = following
    pending.wait()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def profile_decode(runner: ModelRunner, batch: int, context: int, out_path: str) -> None:
    """Kernel time table of 10 decode steps (torch.profiler), appended to out_path: where a step's
    time goes when it falls short of the bandwidth bound. With programmatic dependent launch on (the
    default on Hopper) a Triton kernel starts early and its time includes the wait for the kernel
    before it; `--kernels pdl=off --profile FILE ...` gives each kernel's own time."""
    from torch.profiler import ProfilerActivity, profile

    reqs = fake_requests(batch, context, runner.layout.block_size)
    for r in reqs:
        r.token_ids.append(7)
        r.num_computed_tokens = context
    chunks = [ScheduledChunk(r, 1) for r in reqs]
    for _ in range(3):
        runner.execute(chunks)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.execute(chunks)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    with open(out_path, "a") as f:
        f.write(f"== decode batch {batch}, context {context}, 10 steps ==\n{table}\n")


def bench_prefill(runner: ModelRunner, prompt_len: int, budget: int) -> tuple[float, int]:
    n = max(1, budget // prompt_len)
    reqs = fake_requests(n, prompt_len, runner.layout.block_size)
    chunks = [ScheduledChunk(r, prompt_len) for r in reqs]
    return timed(lambda: runner.execute(chunks), 5, warmup=2), n


def shape_facts(cfg: Any, runner: ModelRunner) -> dict[str, float]:
    """Bytes a decode step must read and FLOP-carrying parameters, from the built model."""
    model = runner.model
    elem = next(model.parameters()).element_size()
    params = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    embed = cfg.vocab_size * cfg.hidden_size
    untied_embed = 0 if model.tie_word_embeddings else embed  # a lookup table: read a few rows only
    return {
        "weight_bytes": (params - untied_embed) * elem,
        "layer_params": params - untied_embed - embed,  # every token multiplies by these
        "lm_head_params": embed,  # only the rows that sample
        "kv_bytes_per_token": runner.layout.bytes_per_block / runner.layout.block_size,
        "layers": cfg.num_hidden_layers,
        "q_dim": cfg.num_attention_heads * runner.layout.head_dim,
    }


def run_shape(shape: str, args: argparse.Namespace, ceil: dict[str, float]) -> dict[str, Any]:
    cfg = AutoConfig.from_pretrained(resolve_model(shape))
    max_batch = max(args.batches)
    per_seq_blocks = -(-(max(args.context, args.prompt_len) + 1) // 16)
    blocks = max(max_batch * per_seq_blocks, (args.budget // args.prompt_len + 1) * per_seq_blocks) + 1
    t0 = time.perf_counter()
    runner = make_runner(shape, blocks, max_batch, args.budget, args.eager, args.kernels)
    load_s = time.perf_counter() - t0
    facts = shape_facts(cfg, runner)
    out: dict[str, Any] = {"shape": shape, "load_seconds": load_s, **facts, "decode": [], "prefill": {}}
    for b in args.batches:
        t = bench_decode(runner, b, args.context)
        tp = bench_decode_pipelined(runner, b, args.context)
        kv = b * (args.context + 1) * facts["kv_bytes_per_token"]
        bound = (facts["weight_bytes"] + kv) / (ceil["copy_gbps"] * 1e9)
        out["decode"].append(
            {
                "batch": b,
                "context": args.context,
                "step_ms": t * 1e3,
                "bound_ms": bound * 1e3,
                "fraction_of_bound": bound / t,
                "tokens_per_s": b / t,
                "pipelined_step_ms": tp * 1e3,  # launched behind the step before (engine/ahead.py)
                "pipelined_fraction_of_bound": bound / tp,
            }
        )
        print(
            f"{shape} decode b={b}: {t * 1e3:.2f} ms (bound {bound * 1e3:.2f} ms, {bound / t:.0%}); "
            f"launched ahead: {tp * 1e3:.2f} ms ({bound / tp:.0%})"
        )
        if args.profile:
            profile_decode(runner, b, args.context, args.profile)
    if args.no_prefill:
        return out
    t, n = bench_prefill(runner, args.prompt_len, args.budget)
    tokens = n * args.prompt_len
    attn = 2 * facts["layers"] * facts["q_dim"] * args.prompt_len**2 * n  # causal: half of 4*L^2*d
    flops = 2 * facts["layer_params"] * tokens + 2 * facts["lm_head_params"] * n + attn
    out["prefill"] = {
        "prompts": n,
        "prompt_len": args.prompt_len,
        "tokens": tokens,
        "seconds": t,
        "tflops": flops / t / 1e12,
        "fraction_of_matmul": flops / t / 1e12 / ceil["matmul_tflops"],
    }
    print(
        f"{shape} prefill {n}x{args.prompt_len}: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s "
        f"({out['prefill']['fraction_of_matmul']:.0%} of matmul)"
    )
    del runner
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen2.5-7b,qwen2.5-32b")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=1100)
    ap.add_argument("--budget", type=int, default=8192, help="prefill token budget of one step")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--output", default=None)
    ap.add_argument("--profile", default=None, help="append a kernel table of each decode batch here")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--kernels", default="", help="kernel options, e.g. pdl=off,split_norm=off")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.kernels = KernelConfig.parse(args.kernels)
    print(f"kernels: {args.kernels}")
    ceil = ceilings()
    print(f"ceilings: {ceil}")
    results = {
        "date": str(date.today()),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "eager": args.eager,
        "kernels": str(args.kernels),
        "ceilings": ceil,
        "shapes": [run_shape(s, args, ceil) for s in args.shapes.split(",")],
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

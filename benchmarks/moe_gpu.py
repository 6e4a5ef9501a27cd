"""MoE on one GPU (issue 26): the qwen3-30b-a3b and ernie-4.5-21b-a3b shapes, dummy bf16 weights.

First the ceilings, measured in the same run (benchmarks/gpu_engine.py): bf16 matmul TFLOP/s and device
copy GB/s. Then per shape:

- one MoE block alone (router + fused Triton experts + shared expert), replayed from a CUDA graph, at
  decode batches 1/32/128 and a 4096-token prefill: time vs the bound that counts only the experts the
  routing picked (distinct experts x 3 x H x I x 2 bytes, plus router and shared expert, / copy GB/s);
  prefill MFU = 2 x (top-k + shared) expert FLOPs per token x tokens / time / matmul ceiling. The torch
  reference's decode time is given beside it;
- with --quantization wint8,wint4,fp8 the same block again per format (routed and shared experts
  quantized as --quantization does at load), through the quantized fused kernel: decode time vs that
  format's bound (the picked experts' quantized bytes, scales included), its ratio to the bf16 block,
  and beside it the path it replaces (both stacks dequantized to bf16, then the bf16 fused kernel);
- the whole model through the engine's ModelRunner (CUDA graphs): decode step at B = 1/32/128 with a
  1k context vs the bound = (weights outside the routed experts + the distinct experts each MoE layer's
  routing picked in that step + KV read) / copy GB/s; prefill of 4 x 1024 tokens in one step as MFU.

    python3 benchmarks/moe_gpu.py --out $OUT/moe.json
    python3 benchmarks/moe_gpu.py --shapes qwen3-30b-a3b --no-model --out moe.json   # blocks only
    python3 benchmarks/moe_gpu.py --shapes qwen3-30b-a3b --no-model --quantization wint8,wint4,fp8 \
        --out $OUT/moe_quant.json   # bf16 vs the quantized fused MoE
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from datetime import date
from typing import Any

import torch
from common import timed  # benchmarks/ is sys.path[0]
from gpu_engine import ceilings, fake_requests, make_runner
from transformers import AutoConfig

from pdserve.distributed.group import TPGroup
from pdserve.engine.scheduler import ScheduledChunk
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.factory import build_kernels
from pdserve.layers.moe import FusedExperts, Router, SparseMoeBlock, experts_torch
from pdserve.layers.quant import LoadQuantizable, dequantize
from pdserve.models.prepare import resolve_model
from pdserve.models.registry import model_class

DTYPE = torch.bfloat16


def graphed(fn: Any) -> Any:
    """fn captured in a CUDA graph (after a warm-up run); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def moe_block(cfg: Any, device: str = "cuda", quantization: str = "bf16") -> SparseMoeBlock:
    """The first MoE layer's block of the shape, dummy weights, bf16 on `device`; its experts (routed
    and shared) then quantized by `quantization` unless that is bf16."""
    kernels = build_kernels(KernelConfig(), torch.device(device))
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device("meta"):
            model = model_class(cfg)(cfg, kernels, TPGroup.single())
        index = next(i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoeBlock))
        with torch.device(device):
            block = type(model).build_mlp(model, cfg, index, TPGroup.single(), kernels)
    finally:
        torch.set_default_dtype(torch.float32)
    assert isinstance(block, SparseMoeBlock)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # init_dummy's scale (it takes whole models only)
        for p in block.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    if quantization != "bf16":
        for module in [m for m in block.modules() if isinstance(m, LoadQuantizable)]:
            module.quantize(quantization)
    return block.eval().requires_grad_(False)


def block_bytes(block: SparseMoeBlock, ids: torch.Tensor) -> tuple[float, int]:
    """(bytes a pass must read: picked experts, router, shared expert; distinct experts picked)."""
    experts = block.experts
    distinct = int(torch.unique(ids).numel())
    # bf16 stacks or the quantized ones (data and scales): the same bytes for every expert
    per_expert = sum(p.numel() * p.element_size() for p in experts.parameters()) / experts.num_experts
    rest = sum(
        p.numel() * p.element_size() for n, p in block.named_parameters() if not n.startswith("experts.")
    )
    return distinct * per_expert + rest, distinct


def bench_block(
    shape: str, cfg: Any, ceil: dict[str, float], batches: list[int], prefill: int, quantization: str = "bf16"
) -> dict[str, Any]:
    block = moe_block(cfg, quantization=quantization)
    hidden = block.experts.hidden
    out: dict[str, Any] = {"quantization": quantization, "decode": [], "prefill": {}}
    for tokens in [*batches, prefill]:
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
        ids, weights = block.gate(x)
        need, distinct = block_bytes(block, ids)
        with torch.inference_mode():
            replay = graphed(lambda x=x: block(x))
            t = timed(replay, 50 if tokens < prefill else 10)
        row: dict[str, Any] = {"tokens": tokens, "ms": t * 1e3, "distinct_experts": distinct}
        if tokens < prefill:
            bound = need / (ceil["copy_gbps"] * 1e9)
            ref_name, ref = baseline(block, x, ids, weights)
            row |= {"bound_ms": bound * 1e3, "fraction_of_bound": bound / t, ref_name: ref * 1e3}
            out["decode"].append(row)
            print(
                f"{shape} MoE block {quantization} T={tokens}: {t * 1e3:.3f} ms, bound {bound * 1e3:.3f} ms "
                f"({bound / t:.0%}), {distinct} experts; {ref_name[:-3].replace('_', ' ')} {ref * 1e3:.3f} ms"
            )
        else:
            row |= prefill_rate(block, ids, tokens, t, ceil)
            out["prefill"] = row
            print(f"{shape} MoE block {quantization} prefill T={tokens}: {t * 1e3:.2f} ms, "
                  f"{row['tflops']:.0f} TFLOP/s ({row['mfu_vs_matmul']:.0%} of matmul)")  # fmt: skip
    return out


def baseline(
    block: SparseMoeBlock, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[str, float]:
    """What the block's experts are compared with at decode: bf16, the torch reference; quantized, the
    path the quantized kernel replaced (both stacks dequantized to bf16 every step, the bf16 kernel)."""
    experts = block.experts
    e, rows = experts.num_experts, 2 * experts.local
    q13, q2 = experts.q13, experts.q2
    with torch.inference_mode():
        if q13 is None or q2 is None:
            return "torch_reference_ms", timed(
                lambda: experts_torch(x, experts.w13, experts.w2, ids, weights), 10
            )
        assert experts.fused is not None
        fused = experts.fused.float_experts

        def dequantized() -> torch.Tensor:
            w13 = dequantize(q13, DTYPE).view(e, rows, experts.hidden)
            return fused(x, w13, dequantize(q2, DTYPE).view(e, experts.hidden, experts.local), ids, weights)

        return "dequantize_then_bf16_kernel_ms", timed(dequantized, 20)


def prefill_rate(
    block: SparseMoeBlock, ids: torch.Tensor, tokens: int, t: float, ceil: dict[str, float]
) -> dict[str, float]:
    """The prefill block's TFLOP/s (routed top-k + shared expert products) and its share of the ceiling."""
    shared = block.shared_expert
    shared_i = 0 if shared is None else shared.down_proj.in_features
    flops = 2 * 3 * block.experts.hidden * tokens * (ids.shape[1] * block.experts.local + shared_i)
    tflops = flops / t / 1e12
    return {"tflops": tflops, "mfu_vs_matmul": tflops / ceil["matmul_tflops"]}


def compare(shape: str, results: dict[str, Any]) -> None:
    """Each quantized format's decode time as a fraction of bf16's, per batch, as a table."""
    base = results.get("block", {}).get("decode", [])
    for fmt, entry in results.items():
        if not fmt.startswith("block_") or "decode" not in entry:
            continue
        for b, q in zip(base, entry["decode"], strict=True):
            print(
                f"{shape} T={q['tokens']:>4} {fmt[6:]:>5}: {q['ms']:.3f} ms = {q['ms'] / b['ms']:.2f}x bf16 "
                f"({b['ms']:.3f} ms); {q['fraction_of_bound']:.0%} of its bound "
                f"(bf16 {b['fraction_of_bound']:.0%} of its own)"
            )


def distinct_per_step(runner: Any, chunks: list[ScheduledChunk]) -> list[int]:
    """Distinct experts each MoE layer's router picks in one (eager) step of `chunks`."""
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(int(torch.unique(out[0]).numel())))
        for m in runner.model.modules()
        if isinstance(m, Router)
    ]
    graphs, runner.graphs = runner.graphs, None
    try:
        runner.execute(chunks)
    finally:
        runner.graphs = graphs
        for h in hooks:
            h.remove()
    return seen


def model_bytes(runner: Any, cfg: Any) -> tuple[float, float, float]:
    """(bytes outside routed experts a step reads, bytes of one routed expert, routed-expert params)."""
    model = runner.model
    blocks = [m for m in model.modules() if isinstance(m, FusedExperts)]
    routed = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    embed = 0 if model.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # a lookup: a few rows
    per_expert = 3 * blocks[0].hidden * blocks[0].local * DTYPE.itemsize
    return (total - routed - embed) * DTYPE.itemsize, per_expert, routed


def bench_model(
    shape: str, cfg: Any, ceil: dict[str, float], batches: list[int], context: int
) -> dict[str, Any]:
    per_seq = -(-(context + 1) // 16)
    blocks = max(batches) * per_seq + 4 * (-(-1025 // 16)) + 1
    t0 = time.perf_counter()
    runner = make_runner(shape, blocks, max(batches), 4096, False, KernelConfig())
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0, "decode": [], "prefill": {}}
    dense_bytes, per_expert, routed = model_bytes(runner, cfg)
    kv_per_token = runner.layout.bytes_per_block / runner.layout.block_size
    for b in batches:
        reqs = fake_requests(b, context, runner.layout.block_size)
        for r in reqs:
            r.token_ids.append(7)
            r.num_computed_tokens = context
        chunks = [ScheduledChunk(r, 1) for r in reqs]
        distinct = distinct_per_step(runner, chunks)
        t = timed(lambda c=chunks: runner.execute(c), 20)
        need = dense_bytes + sum(distinct) * per_expert + b * (context + 1) * kv_per_token
        bound = need / (ceil["copy_gbps"] * 1e9)
        out["decode"].append(
            {"batch": b, "context": context, "step_ms": t * 1e3, "bound_ms": bound * 1e3,
             "fraction_of_bound": bound / t, "distinct_experts_per_layer": sum(distinct) / len(distinct)}
        )  # fmt: skip
        print(
            f"{shape} decode B={b}: {t * 1e3:.2f} ms, bound {bound * 1e3:.2f} ms ({bound / t:.0%}), "
            f"{sum(distinct) / len(distinct):.0f} experts/layer"
        )
    reqs = fake_requests(4, 1024, runner.layout.block_size)
    chunks = [ScheduledChunk(r, 1024) for r in reqs]
    t = timed(lambda: runner.execute(chunks), 5, warmup=2)
    k = getattr(cfg, "num_experts_per_tok", None) or cfg.moe_k
    experts = getattr(cfg, "num_experts", None) or cfg.moe_num_experts
    lm_head = cfg.vocab_size * cfg.hidden_size  # only each prompt's last row goes through it
    active = dense_bytes / DTYPE.itemsize - lm_head + routed * k / experts  # params a token multiplies by
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * runner.layout.head_dim * 1024**2 * 4
    flops = 2 * active * 4096 + 2 * lm_head * 4 + attn
    tflops = flops / t / 1e12
    out["prefill"] = {
        "tokens": 4096,
        "ms": t * 1e3,
        "tflops": tflops,
        "mfu_vs_matmul": tflops / ceil["matmul_tflops"],
    }
    print(
        f"{shape} prefill 4x1024: {t * 1e3:.1f} ms, {tflops:.0f} TFLOP/s "
        f"({tflops / ceil['matmul_tflops']:.0%} of matmul)"
    )
    runner.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-30b-a3b,ernie-4.5-21b-a3b")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=4096, help="tokens of the MoE-block prefill case")
    ap.add_argument("--no-model", action="store_true", help="MoE blocks only, no whole-model runs")
    ap.add_argument("--quantization", default="", help="e.g. wint8,wint4,fp8: the block again per format")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ceil = ceilings()
    print(f"{torch.cuda.get_device_name()}: {ceil}")
    results: dict[str, Any] = {
        "date": str(date.today()), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "host": platform.node(), "ceilings": ceil, "shapes": {},
    }  # fmt: skip
    for shape in args.shapes.split(","):
        cfg = AutoConfig.from_pretrained(resolve_model(shape))
        entry: dict[str, Any] = results["shapes"].setdefault(shape, {})
        parts = [("block", lambda s=shape, c=cfg: bench_block(s, c, ceil, batches, args.prefill))]
        for q in filter(None, args.quantization.split(",")):
            parts.append(
                (f"block_{q}", lambda s=shape, c=cfg, q=q: bench_block(s, c, ceil, batches, args.prefill, q))
            )
        if not args.no_model:
            parts.append(("model", lambda s=shape, c=cfg: bench_model(s, c, ceil, batches, args.context)))
        for name, run in parts:
            try:
                entry[name] = run()
            except Exception as e:  # one part failing still leaves the others' numbers
                traceback.print_exc()
                entry[name] = {"error": repr(e)}
            torch.cuda.empty_cache()  # the part's model is gone: free its memory for the next
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=2)
        compare(shape, entry)


if __name__ == "__main__":
    main()

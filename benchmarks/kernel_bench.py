"""Times pdserve's Triton attention and fused kernels on CUDA against the torch backend and plain SDPA.

Decode: batch 1/32/128 at a 1k context, Qwen2.5-7B (28 q / 4 kv heads) and 32B (40 / 8) shapes, bf16;
reports achieved GB/s of KV read (K + V bytes of the context / time). Prefill: 1100-token prompts (and
one 1100-token chunk over an 1100-token cached prefix); reports TFLOP/s of causal attention
(4 * head_dim * heads per visible query-key pair). Fused: residual-add + RMSNorm and SiLU·mul, GB/s.
Every timing is the median over repetitions of CUDA-event-timed loops, rotating among enough input
sets that the working set is larger than the L2 cache, taken twice: eager (Python launches, so launch
overhead included) and replayed from a CUDA graph (the GPU time; rates come from this one).

    python benchmarks/kernel_bench.py --output kernel_bench.json
    python benchmarks/kernel_bench.py --sweep-decode --output decode_sweep.json   # tune the decode kernel
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels import triton_fused
from pdserve.kernels.attention.triton_decode import choose_num_splits, paged_decode
from pdserve.kernels.attention.triton_prefill import paged_prefill
from pdserve.kernels.norm import rms_norm
from pdserve.kernels.pdl import Pdl
from pdserve.kernels.tuning.tables import Tuning, tuning_for
from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.layers.attention.torch_backend import TorchAttentionBackend

MODELS = {"qwen2.5-7b": (28, 4, 128), "qwen2.5-32b": (40, 8, 128)}  # q heads, kv heads, head_dim
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
WORKING_SET = 256 << 20  # bytes of inputs cycled through per timing: well over a 50-60 MB L2


@dataclass
class Result:
    kind: str
    model: str
    batch: int
    context: int
    impl: str
    ms: float  # eager: launched from Python each time, launch overhead included
    graph_ms: float | None  # replayed from a CUDA graph: the GPU time (None: capture failed)
    rate: float  # GB/s for decode and fused, TFLOP/s for prefill, from graph_ms when there is one
    unit: str


def time_ms(calls: list[Callable[[], object]], inner: int = 20, reps: int = 7) -> float:
    """Median over `reps` of the mean time of `inner` calls (at least one each), cycling through `calls`."""
    inner = max(inner, len(calls))
    for call in calls[:3]:
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            calls[i % len(calls)]()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def graph_ms(calls: list[Callable[[], object]], inner: int = 20, reps: int = 7) -> float | None:
    """Like time_ms, with the `inner` calls captured once in a CUDA graph and replayed."""
    inner = max(inner, len(calls))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs asks
        for call in calls[:3]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(inner):
                calls[i % len(calls)]()
    except RuntimeError:  # not capturable (a host sync inside)
        torch.cuda.synchronize()
        return None
    return time_ms([graph.replay], inner=1, reps=reps) / inner


def measure(
    kind: str,
    model: str,
    batch: int,
    ctx: int,
    impl: str,
    calls: list[Callable[[], object]],
    work: float,
    unit: str,
) -> Result:
    """work: bytes (rate in GB/s) or FLOPs (rate in TFLOP/s, unit says which)."""
    eager, graphed = time_ms(calls), graph_ms(calls)
    scale = 1e6 if unit == "GB/s" else 1e9
    return Result(kind, model, batch, ctx, impl, eager, graphed, work / (graphed or eager) / scale, unit)


def copies(bytes_each: int) -> int:
    return max(2, min(128, -(-WORKING_SET // max(1, bytes_each))))


def paged_inputs(seqs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int) -> tuple:
    """(q, k, v, kv_cache, meta) for sequences of (context, new tokens), blocks scattered at random."""
    dev = torch.device("cuda")
    need = [-(-ctx // BLOCK_SIZE) for ctx, _ in seqs]
    order = list(range(sum(need)))
    random.shuffle(order)
    tables, slots, starts, at = [], [], [0], 0
    for (ctx, n), nb in zip(seqs, need, strict=True):
        blocks, at = order[at : at + nb], at + nb
        tables.append(blocks + [0] * (max(need) - nb))
        slots.extend(blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx - n, ctx))
        starts.append(starts[-1] + n)
    ctx_lens = [ctx for ctx, _ in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        block_tables=torch.tensor(tables, device=dev),
        seq_lens=torch.tensor(ctx_lens, device=dev),
        query_start_loc=starts,
        context_lens=ctx_lens,
        num_decodes=sum(1 for _, n in seqs if n == 1),
        block_size=BLOCK_SIZE,
        query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=dev),
    )
    t = starts[-1]
    cache = torch.randn(2, sum(need), BLOCK_SIZE, kv_heads, dim, dtype=DTYPE, device=dev)
    q, k, v = (torch.randn(t, h, dim, dtype=DTYPE, device=dev) for h in (heads, kv_heads, kv_heads))
    return q, k, v, cache, meta


def _tuning() -> Tuning:
    return tuning_for("auto", torch.device("cuda"))


def _pdl(t: Tuning) -> Pdl:
    """PDL as the engine launches the decode kernels: on, up to the tuning's row limits."""
    return Pdl(True, t.pdl_max_rows, t.pdl_attention_max_rows)


def _num_splits(batch: int, kv_heads: int, ctx: int) -> int:
    t = _tuning()
    return choose_num_splits(
        batch, kv_heads, ctx, torch.device("cuda"), t.decode_max_splits, t.decode_min_split_tokens
    )


def bench_decode(model: str, batch: int, ctx: int) -> list[Result]:
    heads, kv_heads, dim = MODELS[model]
    kv_bytes = 2 * batch * ctx * kv_heads * dim * DTYPE.itemsize
    sets = [paged_inputs([(ctx, 1)] * batch, heads, kv_heads, dim) for _ in range(copies(kv_bytes))]
    splits = _num_splits(batch, kv_heads, ctx)
    torch_backend = TorchAttentionBackend(heads, kv_heads, dim, dim**-0.5)
    pdl, tiles = _pdl(_tuning()), _tuning().attention

    def triton_call(s: tuple) -> Callable[[], None]:
        q, _, _, cache, meta = s
        out = torch.empty_like(q)
        return lambda: paged_decode(
            q, cache, meta.block_tables, meta.seq_lens, out, dim**-0.5, splits, tiles, pdl=pdl
        )

    def sdpa_call(s: tuple) -> Callable[[], torch.Tensor]:
        q = s[0].unsqueeze(2)  # [B, H, 1, D]
        k = torch.randn(batch, kv_heads, ctx, dim, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, enable_gqa=True)

    impls: dict[str, list[Callable[[], object]]] = {
        f"triton(splits={splits})": [triton_call(s) for s in sets],
        "torch_backend": [lambda s=s: torch_backend.forward(*s) for s in sets],
        "sdpa_contiguous": [sdpa_call(s) for s in sets],
    }
    return [measure("decode", model, batch, ctx, n, c, kv_bytes, "GB/s") for n, c in impls.items()]


def sweep_decode(model: str, batch: int, ctx: int) -> list[Result]:
    """The split kernel's (BLOCK_N, warps, stages) and split count around the defaults, graph-timed:
    what the tuning's decode tile and choose_num_splits should pick on this GPU."""
    heads, kv_heads, dim = MODELS[model]
    kv_bytes = 2 * batch * ctx * kv_heads * dim * DTYPE.itemsize
    sets = [paged_inputs([(ctx, 1)] * batch, heads, kv_heads, dim) for _ in range(copies(kv_bytes))]
    chosen = _num_splits(batch, kv_heads, ctx)
    max_splits, pdl, tiles = _tuning().decode_max_splits, _pdl(_tuning()), _tuning().attention
    results = []
    # one split too: a program a (sequence, kv head) streaming all its tiles, deeper pipelines to keep
    # enough bytes in flight (at B=32 the defaults read 74% of bandwidth in the engine, 91% at B=128)
    for splits in sorted({1, max(1, chosen // 2), chosen, min(max_splits, chosen * 2)}):
        for config in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            calls = []
            for q, _, _, cache, meta in sets:
                out = torch.empty_like(q)
                args = (q, cache, meta.block_tables, meta.seq_lens, out, dim**-0.5, splits, tiles, config)
                calls.append(lambda a=args: paged_decode(*a, pdl=pdl))
            ms = graph_ms(calls)
            if ms is not None:
                impl = f"splits={splits} n={config[0]} w={config[1]} s={config[2]}"
                results.append(
                    Result("decode-sweep", model, batch, ctx, impl, ms, ms, kv_bytes / ms / 1e6, "GB/s")
                )
    best = max(results, key=lambda r: r.rate)
    default = next(r for r in results if r.impl.startswith(f"splits={chosen} n=64 w=4 s=2"))
    print(
        f"{model} B={batch}: default {default.rate:.0f} GB/s, best {best.rate:.0f} GB/s ({best.impl})",
        flush=True,
    )
    return results


def bench_prefill(model: str, prompts: int, new: int, prefix: int) -> list[Result]:
    heads, kv_heads, dim = MODELS[model]
    ctx = prefix + new
    pairs = prompts * heads * (new * prefix + new * (new + 1) // 2)
    flops = 4 * dim * pairs
    q, k, v, cache, meta = paged_inputs([(ctx, new)] * prompts, heads, kv_heads, dim)
    out = torch.empty_like(q)
    torch_backend = TorchAttentionBackend(heads, kv_heads, dim, dim**-0.5)
    qc = torch.randn(prompts, heads, new, dim, dtype=DTYPE, device="cuda")
    kc = torch.randn(prompts, kv_heads, ctx, dim, dtype=DTYPE, device="cuda")
    vc = torch.randn_like(kc)
    mask = torch.arange(ctx, device="cuda")[None, :] <= torch.arange(prefix, ctx, device="cuda")[:, None]
    qsl = meta.query_start_loc_t
    tiles = _tuning().attention
    impls: dict[str, Callable[[], object]] = {
        "triton": lambda: paged_prefill(
            q, cache, meta.block_tables, meta.seq_lens, qsl, out, dim**-0.5, 0, q.shape[0], tiles
        ),
        "torch_backend": lambda: torch_backend.forward(q, k, v, cache, meta),
        "sdpa_contiguous": lambda: F.scaled_dot_product_attention(
            qc, kc, vc, is_causal=prefix == 0, attn_mask=None if prefix == 0 else mask, enable_gqa=True
        ),
    }
    label = f"prefill(prefix={prefix})"
    return [measure(label, model, prompts, ctx, n, [c], flops, "TFLOP/s") for n, c in impls.items()]


def bench_fused(rows: int, hidden: int, inter: int) -> list[Result]:
    def rand(cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, dtype=DTYPE, device="cuda")

    xr = [(rand(hidden), rand(hidden)) for _ in range(copies(rows * hidden * 2 * DTYPE.itemsize))]
    w = torch.randn(hidden, dtype=DTYPE, device="cuda")
    norm_bytes = 4 * rows * hidden * DTYPE.itemsize  # read x and residual, write out and the new residual
    gu = [rand(2 * inter) for _ in range(copies(rows * inter * 2 * DTYPE.itemsize))]
    silu_bytes = 3 * rows * inter * DTYPE.itemsize  # read gate and up, write out
    cases = {
        ("add_rms_norm", "triton", norm_bytes): [
            lambda x=x, r=r: triton_fused.triton_add_rms_norm(x, r, w, 1e-6) for x, r in xr
        ],
        ("add_rms_norm", "torch", norm_bytes): [lambda x=x, r=r: rms_norm(x + r, w, 1e-6) for x, r in xr],
        ("silu_and_mul", "triton", silu_bytes): [lambda g=g: triton_fused.triton_silu_and_mul(g) for g in gu],
        ("silu_and_mul", "torch", silu_bytes): [lambda g=g: F.silu(g[:, :inter]) * g[:, inter:] for g in gu],
    }
    shape = f"hidden={hidden},inter={inter}"
    return [
        measure(kind, shape, rows, 0, impl, c, nbytes, "GB/s") for (kind, impl, nbytes), c in cases.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="where to write the JSON results")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument(
        "--sweep-decode", action="store_true", help="only: decode configs around the defaults"
    )
    parser.add_argument("--batches", default="1,32,128", help="decode batch sizes, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA GPU")
    random.seed(0)
    torch.manual_seed(0)
    results: list[Result] = []
    batches = [int(b) for b in args.batches.split(",")]
    for model in MODELS if args.sweep_decode else ():
        for batch in batches:
            results += sweep_decode(model, batch, args.context)
    for model in () if args.sweep_decode else MODELS:
        for batch in batches:
            results += bench_decode(model, batch, args.context)
        for prompts in (1, 4):
            results += bench_prefill(model, prompts, 1100, 0)
        results += bench_prefill(model, 1, 1100, 1100)
    if not args.sweep_decode:
        results += bench_fused(128, 3584, 18944) + bench_fused(2048, 3584, 18944)
    device = torch.cuda.get_device_name()
    with open(args.output, "w") as f:
        json.dump(
            {"device": device, "dtype": str(DTYPE), "results": [asdict(r) for r in results]}, f, indent=1
        )
    print(f"{device}, {DTYPE}")
    print(
        f"{'kind':20} {'model':26} {'batch':>5} {'ctx':>5} {'impl':22} {'eager ms':>9} {'graph ms':>9} rate"
    )
    for r in results:
        graphed = f"{r.graph_ms:9.4f}" if r.graph_ms is not None else f"{'-':>9}"
        row = f"{r.kind:20} {r.model:26} {r.batch:5} {r.context:5} {r.impl:22} {r.ms:9.4f} {graphed}"
        print(f"{row} {r.rate:8.1f} {r.unit}")


if __name__ == "__main__":
    main()

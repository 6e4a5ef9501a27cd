"""GPU KV hand-off: one request's KV from a prefill process on cuda:0 to a decode process on cuda:1,
through pdserve's cuda_ipc and nccl transports (and tcp, staged through pinned host memory, for
reference), against the ceiling of a plain GPU-to-GPU copy.

    python benchmarks/kv_transfer_gpu.py [--tokens 1100] [--kinds cuda_ipc,nccl,tcp] [--output out.json]

The request has Qwen2.5-32B's KV shape by default: 64 layers, 8 KV heads, head_dim 128, bf16, so
256 KiB a token (about 282 MB for 1100 tokens), in blocks of 16 tokens. Each process runs a real
KVConnector over a real transport with a synthetic pool (no model); the decode side reserves blocks
and asks, the prefill side sends them when asked, one request at a time. The hand-off time runs from
the prefill's `send_kv` call to the decode's Activate action (one host clock: CLOCK_MONOTONIC); the
sender time to when the prefill no longer reads its blocks; for cuda_ipc, also the copy's own GPU
time (CUDA events around the copies), which separates bandwidth from the control messages' latency.
The decode side checks every byte of the first and last transfer. The ceiling is one large `copy_`
from cuda:0 to cuda:1 in one process. With one GPU, both processes share it (and nccl is skipped:
NCCL needs two).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pool_shape(args: argparse.Namespace, num_blocks: int) -> tuple[int, ...]:
    return (args.layers, 2, num_blocks, args.block_size, args.kv_heads, args.head_dim)


def pattern(shape: tuple[int, ...], block_ids: list[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    """What source blocks `block_ids` hold: small integers (exact in bf16) that differ per block,
    layer and K/V. Shape [layers, 2, len(block_ids), block_size, heads, dim]."""
    layers = torch.arange(shape[0], device=device).view(-1, 1, 1)
    kv = torch.arange(2, device=device).view(1, -1, 1)
    blocks = torch.tensor(block_ids, device=device).view(1, 1, -1)
    values = ((blocks * 7 + layers * 3 + kv) % 61).to(dtype)
    return values.view(*values.shape, 1, 1, 1).expand(*values.shape, *shape[3:]).contiguous()


def connector(kind: str, device: str, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    from pdserve.disagg.connector import KVConnector
    from pdserve.disagg.transport.factory import make_transport
    from pdserve.kv_layout import allocate_kv_pool

    torch.cuda.set_device(device)
    layers, _, blocks, block_size, heads, dim = shape
    pool = allocate_kv_pool(layers, blocks, block_size, heads, dim, dtype, device)  # as the engine's
    layout = {"shape": [shape[0], *shape[3:]], "dtype": str(dtype)}
    return KVConnector(make_transport(kind), pool, layout, "bench", transfer_timeout=60.0)


def prefill_main(kind: str, args: argparse.Namespace, addr_q: Any, times_q: Any) -> None:
    from pdserve.disagg.actions import StartPrefill
    from pdserve.disagg.handoff import FirstToken, PromptKV

    n = -(-args.tokens // args.block_size)
    c = connector(kind, "cuda:0", pool_shape(args, n + 4), DTYPES[args.dtype])
    c.kv_cache[:, :, :n] = pattern(tuple(c.kv_cache.shape), list(range(n)), c.kv_cache.dtype, "cuda:0")
    torch.cuda.synchronize()
    addr_q.put(c.address)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for ev in c.poll():
            if isinstance(ev, StartPrefill):
                tid = ev.target.transfer_id
                kv = PromptKV(ev.request_id, ev.target, tuple(range(len(ev.target.block_ids))))
                start = time.monotonic()
                c.send_kv(kv, FirstToken(1), 0)
                while tid in c.leases:  # the transport still reads our blocks
                    time.sleep(0)
                read = time.monotonic()
                copies = getattr(c.transport, "copy_seconds", None)  # cuda_ipc: the copy's GPU time
                times_q.put((tid, start, read, copies[-1] if copies else None))
                c.request_finished(ev.request_id, ev.target)
        time.sleep(0.0002)


def decode_main(kind: str, args: argparse.Namespace, addr: str, device: str, result_q: Any) -> None:
    from dataclasses import asdict

    from pdserve.disagg.actions import Activate, Fail
    from pdserve.disagg.handoff import FromPrefill
    from pdserve.engine.sampling import SamplingParams

    n = -(-args.tokens // args.block_size)
    c = connector(kind, device, pool_shape(args, 2 * n + 8), DTYPES[args.dtype])
    dst = list(range(n + 8, 2 * n + 8))
    runs = []
    for i in range(args.warmup + args.repeats):
        rid, source = f"r{i}", FromPrefill(addr)
        c.kv_cache[:, :, dst] = 0
        torch.cuda.synchronize()
        c.start_receive(rid, source, list(range(1, args.tokens + 1)), asdict(SamplingParams()), dst)
        tid = c.receiver.transfer_of[rid]
        ready = _wait_ready(c, Activate, Fail)
        if i in (0, args.warmup + args.repeats - 1):
            expected = pattern(tuple(c.kv_cache.shape), list(range(n)), c.kv_cache.dtype, device)
            assert torch.equal(c.kv_cache[:, :, dst], expected), f"{kind}: wrong KV bytes arrived"
        runs.append((tid, ready))
        c.request_finished(rid, source)
    result_q.put({"runs": runs[args.warmup :], "bytes": n * c.block_bytes, "path": c.transport.path_to(addr)})
    c.close()


def _wait_ready(c: Any, ready_type: type, failed_type: type) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for ev in c.poll():
            if isinstance(ev, ready_type):
                return time.monotonic()
            if isinstance(ev, failed_type):
                raise RuntimeError(f"transfer failed: {ev.reason}")
        time.sleep(0.00005)  # like an idle engine: let the transport's threads have the GIL
    raise TimeoutError("no KV within 60 s")


def handoff(kind: str, args: argparse.Namespace, decode_device: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    addr_q, times_q, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    prefill = ctx.Process(target=prefill_main, args=(kind, args, addr_q, times_q), daemon=True)
    prefill.start()
    try:
        addr = addr_q.get(timeout=300)
        decode = ctx.Process(
            target=decode_main, args=(kind, args, addr, decode_device, result_q), daemon=True
        )
        decode.start()
        result = result_q.get(timeout=600)
        decode.join(60)
        sent = {}
        while not times_q.empty():
            tid, start, read, copy_s = times_q.get()
            sent[tid] = (start, read, copy_s)
    finally:
        prefill.kill()
    handoffs = [ready - sent[tid][0] for tid, ready in result["runs"]]
    sender = [sent[tid][1] - sent[tid][0] for tid, _ in result["runs"]]
    copies = [sent[tid][2] for tid, _ in result["runs"] if sent[tid][2] is not None]
    median = statistics.median(handoffs)
    gpu_copy = {"copy_median_s": statistics.median(copies)} if copies else {}
    if copies:
        gpu_copy["gbps_copy"] = result["bytes"] / gpu_copy["copy_median_s"] / 1e9
    return {
        **gpu_copy,
        "path": result["path"],
        "bytes": result["bytes"],
        "handoff_median_s": median,
        "handoff_min_s": min(handoffs),
        "sender_median_s": statistics.median(sender),
        "gbps": result["bytes"] / median / 1e9,
        "gbps_sender": result["bytes"] / statistics.median(sender) / 1e9,
    }


def copy_ceiling(nbytes: int, src: str, dst: str, repeats: int = 20) -> float:
    """GB/s of one large cudaMemcpy from `src` to `dst` (peer copy over NVLink/PCIe when they differ)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=src)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(src)
    torch.cuda.synchronize(dst)
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize(src)
    torch.cuda.synchronize(dst)
    return nbytes * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1100)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--kinds", default="cuda_ipc,nccl,tcp")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ceiling-mib", type=int, default=1024)
    ap.add_argument("--output", default=None, help="write the results as JSON here too")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    decode_device = "cuda:1" if gpus >= 2 else "cuda:0"
    ceiling = copy_ceiling(args.ceiling_mib << 20, "cuda:0", decode_device)
    report: dict[str, Any] = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "torch": torch.__version__,
        "request": {k: getattr(args, k) for k in ("tokens", "layers", "kv_heads", "head_dim", "block_size")},
        "dtype": args.dtype,
        "ceiling": {"what": f"copy_ {args.ceiling_mib} MiB cuda:0 -> {decode_device}", "gbps": ceiling},
        "transports": {},
    }
    for kind in args.kinds.split(","):
        if kind == "nccl" and gpus < 2:
            continue
        r = handoff(kind, args, decode_device)
        r["fraction_of_ceiling"] = r["gbps"] / ceiling
        if "gbps_copy" in r:
            r["copy_fraction_of_ceiling"] = r["gbps_copy"] / ceiling
        report["transports"][kind] = r
        ms = r["handoff_median_s"] * 1e3
        print(
            f"{kind:9s} {r['bytes'] / 1e6:.0f} MB in {ms:.2f} ms: {r['gbps']:.1f} GB/s "
            f"({r['fraction_of_ceiling']:.0%} of the {ceiling:.0f} GB/s copy ceiling); "
            f"sender done in {r['sender_median_s'] * 1e3:.2f} ms"
            + (f"; the copy itself {r['copy_median_s'] * 1e3:.2f} ms" if "copy_median_s" in r else ""),
            flush=True,
        )
    print(json.dumps(report, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

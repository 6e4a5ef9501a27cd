"""TTFT added by disaggregation, one request at a time, with and without layer-wise KV streaming.

Two real engines in two processes, as in serving: a prefill engine on cuda:0 (a child process) and
a decode engine on cuda:1 (this one); dummy weights of a model shape, bf16, cuda_ipc between them.
(A first version ran both in one process: there the decode pool is the very tensor on cuda:1, so a
layer's strided copy became a cross-device copy, ordered against both devices' streams, which is
not what two processes do: they copy into a mapping of the peer's pool on their own GPU.)
Per repeat, three requests of fresh random prompts, one after the other, each timed from add_request
to the first token out of the decode engine (the prefill process switches streaming between them):

- local: the decode engine computes the prompt itself (no KV from anywhere): the colocated TTFT;
- pd: prefill on cuda:0, KV copied into cuda:1's pool after the prefill step (send_kv);
- pd-stream: the same with --kv-stream-layers: each layer's KV is copied while the next computes.

"added" = pd - local, as a fraction of local.

    python3 benchmarks/handoff_ttft_gpu.py --model qwen2.5-32b --tokens 1100 --repeats 10 --output f.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import random
import statistics
import time
from dataclasses import replace
from datetime import date
from typing import Any

import torch

from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import Engine
from pdserve.engine.sampling import SamplingParams
from pdserve.models.prepare import resolve_model

MODES = ("local", "pd", "pd-stream")


def make_engine(args: argparse.Namespace, role: str, device: str) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(
                path=resolve_model(args.model),
                device=device,
                dtype=args.dtype,
                load_format=args.load_format,
                tokenizer=args.tokenizer,
                gpu_memory_utilization=0.85,
            ),
            cache=CacheConfig(block_size=16, enable_prefix_caching=False),
            disagg=DisaggConfig(role=role, kv_transport=args.kv_transport),
        )
    )


def prefill_main(args: argparse.Namespace, device: str, replies: Any, orders: Any) -> None:
    """The prefill engine, in its own process as in serving: sends its KV address, then steps; an order
    "stream" / "plain" switches layer-wise streaming (acknowledged), "stop" ends it."""
    engine = make_engine(args, "prefill", device)
    assert engine.connector is not None
    replies.put(engine.connector.address)
    plain = engine.config.disagg
    while True:
        try:
            order = orders.get_nowait()
        except queue.Empty:
            order = None
        if order == "stop":
            break
        if order is not None:
            engine.config = replace(engine.config, disagg=replace(plain, stream_layers=order == "stream"))
            replies.put(order)
        engine.step()
        if engine.idle:
            time.sleep(0.0002)
    replies.put(engine.connector.transfers_streamed)
    engine.close()


def ttft(decode: Engine, prompt: list[int], kv: dict[str, str] | None) -> float:
    """Seconds from add_request to the decode engine's first token (the request is then drained)."""
    rid = f"r{random.getrandbits(40)}"
    start = time.monotonic()
    decode.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), kv)
    first = None
    while True:
        outs = [o for o in decode.step() if o.request_id == rid]
        if first is None and any(o.new_token_ids for o in outs):
            first = time.monotonic() - start
        if any(o.finished for o in outs):
            assert first is not None and all(o.error is None for o in outs), outs
            return first
        if not outs:
            time.sleep(0.0002)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-32b")
    ap.add_argument("--tokenizer", default=".whl/tokenizer")
    ap.add_argument("--tokens", type=int, default=1100)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--output", default=None)
    ap.add_argument("--devices", default="cuda:0,cuda:1", help="prefill,decode")
    ap.add_argument("--kv-transport", default="cuda_ipc")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--load-format", default="dummy", help="auto: a smoke run with a real checkpoint")
    args = ap.parse_args()
    prefill_device, decode_device = args.devices.split(",")
    ctx = mp.get_context("spawn")
    replies, orders = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=prefill_main, args=(args, prefill_device, replies, orders), daemon=True)
    child.start()
    kv = {"prefill_kv_addr": replies.get(timeout=600)}
    decode = make_engine(args, "decode", decode_device)
    rng = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for i in range(args.repeats + 2):  # the first two: warm-up
            for mode in MODES:
                if mode != "local":
                    orders.put("stream" if mode == "pd-stream" else "plain")
                    assert replies.get(timeout=60) in ("stream", "plain")
                prompt = [rng.randrange(100, 30000) for _ in range(args.tokens)]
                t = ttft(decode, prompt, None if mode == "local" else kv)
                if i >= 2:
                    times[mode].append(t)
    finally:
        orders.put("stop")
    streamed = replies.get(timeout=60)
    child.join(timeout=60)
    report(args, times, streamed)
    decode.close()


def report(args: argparse.Namespace, times: dict[str, list[float]], streamed: int) -> None:
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    local = med["local"]
    result = {
        "model": args.model,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": date.today().isoformat(),
        "median_ttft_ms": med,
        "added_ms": {m: med[m] - local for m in MODES[1:]},
        "added_fraction": {m: (med[m] - local) / local for m in MODES[1:]},
        "all_ttft_ms": {m: [t * 1e3 for t in v] for m, v in times.items()},
        "transfers_streamed": streamed,
    }
    for m in MODES:
        extra = "" if m == "local" else f"  added {med[m] - local:+.2f} ms ({(med[m] - local) / local:+.1%})"
        print(f"{m:10s} TTFT median {med[m]:8.2f} ms{extra}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

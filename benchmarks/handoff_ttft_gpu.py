"""TTFT added by disaggregation, one request at a time, with and without layer-wise KV streaming.

Two real engines in this process: a prefill engine on cuda:0 and a decode engine on cuda:1 (dummy
weights of a model shape, bf16, cuda_ipc between them; the prefill engine steps in its own thread,
as it would in its own process). Per repeat, three requests of fresh random prompts, one after the
other, each timed from add_request to the first token out of the decode engine:

- local: the decode engine computes the prompt itself (no KV from anywhere): the colocated TTFT;
- pd: prefill on cuda:0, KV copied into cuda:1's pool after the prefill step (send_kv);
- pd-stream: the same with --kv-stream-layers: each layer's KV is copied while the next computes.

"added" = pd - local, as a fraction of local (issue 4's target: at most 5% of the prefill time).

    python3 benchmarks/handoff_ttft_gpu.py --model qwen2.5-32b --tokens 1100 --repeats 10 --output f.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from dataclasses import replace
from datetime import date

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


def prefill_loop(engine: Engine, stop: threading.Event) -> None:
    while not stop.is_set():
        engine.step()
        if engine.idle:
            time.sleep(0.0002)


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
    prefill = make_engine(args, "prefill", prefill_device)
    decode = make_engine(args, "decode", decode_device)
    assert prefill.connector is not None
    kv = {"prefill_kv_addr": prefill.connector.address}
    plain_disagg = prefill.config.disagg
    stream_disagg = replace(plain_disagg, stream_layers=True)
    stop = threading.Event()
    worker = threading.Thread(target=prefill_loop, args=(prefill, stop), daemon=True)
    worker.start()
    rng = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for i in range(args.repeats + 2):  # the first two: warm-up
            for mode in MODES:
                prefill.config = replace(
                    prefill.config, disagg=stream_disagg if mode == "pd-stream" else plain_disagg
                )
                prompt = [rng.randrange(100, 30000) for _ in range(args.tokens)]
                t = ttft(decode, prompt, None if mode == "local" else kv)
                if i >= 2:
                    times[mode].append(t)
    finally:
        stop.set()
        worker.join()
    report(args, times, prefill.connector.transfers_streamed)
    prefill.close()
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

"""Sampling time per decode step on a GPU: what `Sampler.sample_later` dispatches to (the plain
kernel for temperature rows, the same after truncation_triton.py's statistics for min-p rows, and
for top-k / top-p rows truncation_triton.py's search unless `--kernels truncating_sampler=off` sends
them to the sort) against the torch path alone, at batch 1, 8, 32 and 128 over a 152k vocabulary
(Qwen2.5's), bf16 logits.

    python3 benchmarks/sampler_gpu.py [--vocab 152064] [--kernels SPEC] [--output sampler_gpu.json]

Logits are random with a few peaked tokens (as a language model's); each figure is the median of 50
calls of `Sampler.sample_later(...)` + wait, by CUDA events, so host launch time counts. "gpu": the
same calls queued behind a ~1 ms sleep kernel, timed from the sleep's end: the GPU's own time, as in
a decode step, where the host queues the sampler while the step's graph still runs. --profile FILE
adds a kernel table (torch.profiler) of 20 top-p calls at 128 rows.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import date

import torch
from common import timed  # this folder: run as a script

from pdserve.engine import sampler
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling import SamplingParams
from pdserve.kernels import sampling_triton
from pdserve.kernels.config import KernelConfig

CASES = {
    "temperature": dict(temperature=0.8),
    "top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "top_k 50 + top_p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "min_p 0.05": dict(temperature=0.8, min_p=0.05),
}


def logits_like_a_model(rows: int, vocab: int) -> torch.Tensor:
    x = torch.randn(rows, vocab, device="cuda") * 2.5
    x[:, :5] += torch.tensor([15.0, 13.0, 12.0, 11.0, 10.0], device="cuda")
    return x.to(torch.bfloat16)


def gpu_ms(fn: Callable[[], object], iters: int = 50) -> float:
    """Median ms of fn's GPU work alone: queued behind a sleep kernel, so its launches are all made
    before the GPU reaches them (fn must not wait for the GPU)."""
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile_top_p(chosen: Sampler, path: str, vocab: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    logits = logits_like_a_model(128, vocab)
    reqs = [Request(f"r{i}", [1], SamplingParams(**CASES["top_p 0.9"])) for i in range(128)]
    chosen.sample_later(logits, reqs).wait()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            chosen.sample_later(logits, reqs).wait()
    with open(path, "w") as f:
        f.write("20 calls, 128 rows, top_p 0.9\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--output", default=None)
    ap.add_argument("--profile", default=None, help="write a kernel table of top-p at 128 rows here")
    ap.add_argument("--kernels", default="", help="KernelConfig spec, e.g. truncating_sampler=off")
    ap.add_argument("--programs-per-sm", type=int, default=None, help="override choose_chunks' aim")
    args = ap.parse_args()
    if args.programs_per_sm:  # a tuning experiment: the module's constant, this process only
        sampling_triton.PROGRAMS_PER_SM = args.programs_per_sm
    chosen = Sampler.for_device(KernelConfig.parse(args.kernels), torch.device("cuda"))
    results = []
    for rows in (1, 8, 32, 128):
        logits = logits_like_a_model(rows, args.vocab)
        for name, kw in CASES.items():
            reqs = [Request(f"r{i}", [1], SamplingParams(**kw)) for i in range(rows)]
            kernel = 1e3 * timed(lambda x=logits, r=reqs: chosen.sample_later(x, r).wait(), 50)
            torch_ms = 1e3 * timed(lambda x=logits, r=reqs: sampler.sample_torch(x, r)[0].tolist(), 50)
            gpu = gpu_ms(lambda x=logits, r=reqs: chosen.sample_later(x, r))
            results.append(
                {"rows": rows, "case": name, "kernel_ms": kernel, "kernel_gpu_ms": gpu, "torch_ms": torch_ms}
            )
            timing = f"dispatched {kernel:7.3f} ms (gpu {gpu:7.3f})   torch {torch_ms:7.3f} ms"
            print(f"B={rows:3d} {name:24s} {timing}", flush=True)
    if args.profile:
        profile_top_p(chosen, args.profile, args.vocab)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(0),
                    "date": date.today().isoformat(),
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

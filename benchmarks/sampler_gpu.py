"""Sampling time per decode step on a GPU: what `sampler.sample_later` dispatches to (the plain
kernel for temperature rows, the same after triton_cut.py's statistics for min-p rows, and for
top-k / top-p rows the torch sort unless PDSERVE_TRUNCATING_KERNEL=1 takes triton_cut.py's search)
against the torch path
alone, at batch 1, 8, 32 and 128 over a 152k vocabulary (Qwen2.5's), bf16 logits.

    python3 benchmarks/sampler_gpu.py [--vocab 152064] [--output sampler_gpu.json]

Logits are random with a few peaked tokens (as a language model's); each figure is the median of 50
calls of `sampler.sample_later(...)` + wait, by CUDA events, so host launch time counts as it does in
a decode step.
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import torch
from gpu_engine import timed  # this folder: run as a script

from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams
from pdserve.layers import sampler

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    results = []
    for rows in (1, 8, 32, 128):
        logits = logits_like_a_model(rows, args.vocab)
        for name, kw in CASES.items():
            reqs = [Request(f"r{i}", [1], SamplingParams(**kw)) for i in range(rows)]
            kernel = 1e3 * timed(lambda x=logits, r=reqs: sampler.sample_later(x, r).wait(), 50)
            torch_ms = 1e3 * timed(lambda x=logits, r=reqs: sampler._sample_torch(x, r)[0].tolist(), 50)
            results.append({"rows": rows, "case": name, "kernel_ms": kernel, "torch_ms": torch_ms})
            print(
                f"B={rows:3d} {name:24s} dispatched {kernel:7.3f} ms   torch {torch_ms:7.3f} ms", flush=True
            )
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

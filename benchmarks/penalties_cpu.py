"""Host cost of the sampler's penalties per decode step (engine/penalties.py), on the CPU: B requests
with P-token random prompts and O outputs each, repetition 1.05 and presence 0.2 (Qwen-style
settings), a 152k vocabulary.

    python benchmarks/penalties_cpu.py [--rows 128] [--prompt 1000] [--outputs 64]

Prints ms per call of: building the flat (row, token, value) arrays (the host work that a GPU step
waits for, once histories exist), apply_penalties on CPU float32 logits (arrays plus torch's
gather/scatter on the CPU), the whole torch sampler (sample_torch, greedy rows), and the baseline
that batching is measured against: a per-row loop (a set() over each row's tokens, a copy and three
torch ops per penalty and row).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable

import torch

from pdserve.engine import penalties, sampler
from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams


def per_call_ms(fn: Callable[[], object], calls: int = 5) -> float:
    fn()  # histories built, allocations warm
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def per_row(logits: torch.Tensor, requests: list[Request]) -> None:
    """The same penalties applied row by row: the baseline apply_penalties batches."""
    for i, req in enumerate(requests):
        p, row = req.params, logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.token_ids)))
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        counted = Counter(req.output_token_ids)
        if counted and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(list(counted)), torch.tensor(list(counted.values()), dtype=row.dtype)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--outputs", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=152064)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.05, presence_penalty=0.2)
    requests = []
    for i in range(args.rows):
        req = Request(f"r{i}", [rng.randrange(args.vocab) for _ in range(args.prompt)], params)
        for _ in range(args.outputs):
            req.append_token(rng.randrange(args.vocab))
        requests.append(req)
    logits = torch.randn(args.rows, args.vocab)
    arrays = per_call_ms(lambda: (penalties._repetition(requests), penalties._frequency(requests, False)))
    work = logits.clone()  # penalized again on every call: the values drift, the work does not
    applied = per_call_ms(lambda: penalties.apply_penalties(work, requests))
    whole = per_call_ms(lambda: sampler.sample_torch(logits, requests))
    before = per_call_ms(lambda: per_row(work, requests))
    print(f"{args.rows} rows: arrays {arrays:.2f} ms, apply_penalties {applied:.2f} ms, ", end="")
    print(f"sampler {whole:.1f} ms; the per-row loop: {before:.2f} ms")


if __name__ == "__main__":
    main()

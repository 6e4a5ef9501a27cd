"""Offline throughput on CPU: pdserve vs transformers `generate` on the same model and prompts.

64 random prompts of ~128 tokens, 128 output tokens each (EOS ignored, so every run does the same work).
transformers runs one request at a time and in padded batches; pdserve takes all prompts at once.
Prints a markdown table for docs/performance.md.

    .venv/bin/python benchmarks/offline_throughput.py [--num-prompts 64] [--hf-batch 16]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch
from transformers import AutoModelForCausalLM

from pdserve import LLM, SamplingParams
from pdserve.models.prepare import resolve_model


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length + rng.randint(-8, 8))] for _ in range(n)]


def bench_pdserve(model_dir: str, prompts: list[list[int]], out_len: int) -> float:
    llm = LLM(model_dir, max_num_seqs=len(prompts), max_num_batched_tokens=4096)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate_ids(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = llm.generate_ids(prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == out_len for o in outs)
    return elapsed


def bench_hf(model, prompts: list[list[int]], out_len: int, batch: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            group = prompts[i : i + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=out_len,
                min_new_tokens=out_len,
                do_sample=False,
                pad_token_id=0,
            )
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-single-prompts", type=int, default=None, help="time one-at-a-time on fewer prompts")
    args = ap.parse_args()
    model_dir = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = make_prompts(args.num_prompts, args.input_len, model.config.vocab_size, seed=0)
    tokens = args.num_prompts * args.output_len
    rows = []
    t = bench_pdserve(model_dir, prompts, args.output_len)
    rows.append(("pdserve (all prompts at once)", tokens / t, t))
    single = prompts[: args.hf_single_prompts or len(prompts)]
    t = bench_hf(model, single, args.output_len, 1)
    rows.append(
        (f"transformers, one at a time ({len(single)} prompts)", len(single) * args.output_len / t, t)
    )
    t = bench_hf(model, prompts, args.output_len, args.hf_batch)
    rows.append((f"transformers, padded batches of {args.hf_batch}", tokens / t, t))
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"{args.num_prompts} prompts x ~{args.input_len} tokens in, {args.output_len} out\n")
    print("| system | output tok/s | seconds |\n|---|---:|---:|")
    for name, tps, sec in rows:
        print(f"| {name} | {tps:.1f} | {sec:.1f} |")
    base = rows[1][1]
    print(
        f"\npdserve / transformers one-at-a-time: {rows[0][1] / base:.2f}x; "
        f"pdserve / padded batches: {rows[0][1] / rows[2][1]:.2f}x"
    )


if __name__ == "__main__":
    main()

"""The serving loop on a GPU: decode time per step through `LLM.generate` (scheduler, runner, sampler,
detokenizer, outputs: everything but HTTP), with and without building outputs while the next step runs.

    python3 benchmarks/engine_loop_gpu.py --model qwen2.5-7b --batch 128 [--no-overlap] [--output f.json]

B prompts of `--input-len` random tokens, `--output-len` tokens each (EOS ignored), dummy weights,
temperature 1 (`--top-p` below 1: each row's top-p cut is searched first, truncation_triton.py;
with the KernelConfig's truncating_sampler off, the torch sort instead;
`--repetition-penalty`: penalized rows, launched ahead with their counts kept on the device).
A first run with one output token measures the prefill; the decode time per step is (full run -
prefill run) / (output_len - 1). Compare with benchmarks/gpu_engine.py's step time at the
same batch (the GPU step alone): the difference is host time the GPU waited for.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from pdserve import LLM, SamplingParams
from pdserve.models.prepare import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--tokenizer", default=".whl/tokenizer")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=129)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--top-p", type=float, default=1.0, help="< 1: rows cut by top-p (truncation_triton.py)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="!= 1: penalized rows")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (with --load-format auto)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--output", default=None, help="append the result as one JSON line here")
    args = ap.parse_args()
    llm = LLM(
        resolve_model(args.model),
        device=args.device,
        load_format=args.load_format,
        tokenizer=args.tokenizer,
        max_num_seqs=args.batch,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
        overlap_outputs=not args.no_overlap,
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(args.input_len)] for _ in range(args.batch)]
    llm.generate_ids(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    times = {}
    for out_len in (1, args.output_len):
        params = SamplingParams(
            temperature=1.0,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            max_tokens=out_len,
            ignore_eos=True,
        )
        t = time.perf_counter()
        outs = llm.generate_ids(prompts, params)
        times[out_len] = time.perf_counter() - t
        assert all(len(o.token_ids) == out_len for o in outs)
    step = (times[args.output_len] - times[1]) / (args.output_len - 1)
    result = {
        "model": args.model,
        "batch": args.batch,
        "overlap_outputs": not args.no_overlap,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "steps_ahead": llm.engine.num_steps_ahead,
        "prefill_s": times[1],
        "total_s": times[args.output_len],
        "decode_step_ms": step * 1e3,
        "output_tok_per_s": args.batch / step,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
    }
    print(json.dumps(result), flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

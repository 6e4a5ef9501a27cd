"""How much each --quantization format changes the default model, on a fixed English text: top-1
agreement of the next-token predictions with the unquantized (float32) model, and perplexity.

The text (TEXT below, ~1,000 tokens, written for this benchmark) runs through each engine's own model
as one prompt (the real layers, kernels and paged KV cache of pdserve; no sampling), and every
position's logits are compared with the float32 model's. Runs on the CPU in a few minutes:

    python3 benchmarks/quant_quality.py --out quant_quality.json
    python3 benchmarks/quant_quality.py --formats wint8,fp8 --device cuda   # the GPU kernels' numbers
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from pdserve import LLM
from pdserve.layers.attention.metadata import one_prompt

TEXT = """\
The lighthouse at the end of the northern breakwater was built in the winter of a year that nobody in \
the harbour town could agree on. The fishermen said it went up the year the ice came into the bay and \
stayed until April; the harbour master, who kept the ledgers, said it was two years later, after the \
storm that took the roof off the customs house. Whatever the year, the tower was made of grey granite \
brought down the coast on flat barges, and it was finished before the first ships of the spring.

For a long time the light was kept by a single family. The keeper climbed the spiral stairs four times \
a night to trim the wick, wind the clockwork that turned the lens, and write the weather in a book \
that still sits in the town museum. The entries are short. Wind from the west, strong. Rain until \
midnight, then clear. Two ships passed, one bound south with timber. On some nights there is only a \
single word, calm, written in a careful hand, and on others the writing runs over the margin because \
the keeper had to stop to help a boat that had lost its way in the fog.

The lens itself was the pride of the town. It was made of hundreds of glass prisms set in a brass \
frame, each one ground so that the light of a small flame was gathered into a narrow beam that could \
be seen more than twenty miles out at sea. Children were allowed to climb the tower once a year, on \
the day the lens was cleaned, and many of them remembered for the rest of their lives how the whole \
room filled with small rainbows when the sun came through the glass.

Electric light came to the tower long after it came to the town. The engineers who installed it \
replaced the clockwork with a motor and the flame with a lamp, and for a while the keeper had very \
little to do. He still wrote the weather in the book, partly out of habit and partly because the \
harbour master still asked for it. Later the light was made automatic, the keeper's house was sold, \
and the book was given to the museum, where visitors read the old entries and try to imagine the \
nights they describe.

Today the lighthouse is still working, although ships no longer need it the way they once did. Every \
boat in the harbour carries a receiver that shows its position to within a few metres, and the \
charts on their screens are more accurate than anything the old keepers could have drawn. Yet the \
fishermen say they still look for the light when they come home at night. It is, one of them \
explained, the first thing that tells you the day is over. You see the beam sweep across the water, \
and you know that the harbour is there, that the town is there, and that someone thought it worth \
the trouble to build a tower of granite at the end of the breakwater so that you would find your way \
back.

The town has changed in other ways as well. The fish market moved to a new building by the road, the \
customs house became a hotel, and the narrow streets behind the harbour filled with cafes and small \
shops that sell maps, postcards and models of the lighthouse carved from driftwood. In the summer \
the population doubles, and in the winter it shrinks again to the families who have lived there for \
generations. They still argue about the year the tower was built, and they probably always will.
"""

FORMATS = ("bf16", "wint8", "wint4", "fp8", "fp8-kv")


@torch.inference_mode()
def text_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of the engine's model over `ids` as one prompt (blocks 0.. of its pool)."""
    runner = llm.engine.runner
    device, block_size, t = runner.device, runner.layout.block_size, len(ids)
    blocks = -(-t // block_size)
    assert blocks <= runner.num_blocks, "the pool is smaller than the text"
    positions = torch.arange(t, device=device)
    meta = one_prompt(t, block_size, device)
    hidden = runner.model(torch.tensor(ids, device=device), positions, runner.kv_caches, meta)
    return runner.model.compute_logits(hidden).float().cpu()


def engine_options(fmt: str) -> dict[str, Any]:
    """LLM(...) options of a row: base (float32), bf16, a --quantization format, or fp8-kv."""
    if fmt == "base":
        return {"dtype": "float32"}
    if fmt == "bf16":
        return {"dtype": "bfloat16"}
    if fmt == "fp8-kv":
        return {"dtype": "float32", "kv_cache_dtype": "fp8"}
    return {"dtype": "float32", "quantization": fmt}


def measure(model: str | None, fmt: str, ids: list[int], device: str) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    llm = LLM(model, device=device, num_blocks=2 + len(ids) // 16, **engine_options(fmt))
    try:
        logits = text_logits(llm, ids)
    finally:
        llm.close()
    return logits, time.perf_counter() - t0


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: the default model)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated rows besides the base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_llm = LLM(args.model, device=args.device, dtype="float32", num_blocks=2)
    ids = base_llm.tokenizer.encode(TEXT)
    base_llm.close()
    base, secs = measure(args.model, "base", ids, args.device)
    base_top1, base_ppl = base.argmax(-1), perplexity(base, ids)
    rows = [{"format": "float32", "top1_agreement": 1.0, "perplexity": base_ppl, "ppl_change": 0.0}]
    print(f"{len(ids)} tokens; float32: perplexity {base_ppl:.3f} ({secs:.0f} s)")
    print(f"{'format':>8} {'top-1 agree':>12} {'perplexity':>11} {'change':>8}")
    for fmt in filter(None, args.formats.split(",")):
        logits, secs = measure(args.model, fmt, ids, args.device)
        ppl = perplexity(logits, ids)
        agree = (logits.argmax(-1) == base_top1).float().mean().item()
        row = {"format": fmt, "top1_agreement": agree, "perplexity": ppl, "ppl_change": ppl / base_ppl - 1}
        rows.append(row)
        print(f"{fmt:>8} {agree:>12.2%} {ppl:>11.3f} {row['ppl_change']:>+8.2%}   ({secs:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": len(ids), "device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

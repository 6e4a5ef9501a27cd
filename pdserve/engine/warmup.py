"""Warm-up steps run once when a GPU runner starts, so no request pays for kernel compilation.

Triton compiles a kernel on its first launch with each new set of compile-time values; the memory
profile and the CUDA graph capture cover one prompt and pure decode steps only. These two eager steps
cover the rest: several prompts in one step, and decodes mixed with a prompt that continues after
tokens already in the cache (the prefix-aware prefill path and eager decode). They write only the KV
slots of the first few blocks, which no request owns yet. Their logits then go through the sampling
kernels serving may take (warm_sampler).
"""

from __future__ import annotations

import torch

from pdserve.distributed.messages import StepInputs
from pdserve.engine.sampler import Sampler
from pdserve.kernels.sampling import RowFilters

_PROMPTS = (5, 19)  # token counts: one under a block, one across blocks at the usual block sizes
_CONTINUE = 3  # tokens of the second prompt computed in the mixed step


def warmup_steps(block_size: int, num_blocks: int) -> list[StepInputs]:
    """The two steps, or none when the pool is too small to hold them."""
    lengths = [_PROMPTS[0] + 1, _PROMPTS[1] + _CONTINUE]  # the most each sequence reaches
    per_seq = [-(-n // block_size) for n in lengths]
    if sum(per_seq) > num_blocks:
        return []
    tables = [list(range(0, per_seq[0])), list(range(per_seq[0], per_seq[0] + per_seq[1]))]
    width = max(per_seq)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def slots(seq: int, positions: range) -> list[int]:
        return [tables[seq][p // block_size] * block_size + p % block_size for p in positions]

    first = StepInputs(
        token_ids=[1] * sum(_PROMPTS),
        positions=[*range(_PROMPTS[0]), *range(_PROMPTS[1])],
        slots=slots(0, range(_PROMPTS[0])) + slots(1, range(_PROMPTS[1])),
        query_start_loc=[0, _PROMPTS[0], sum(_PROMPTS)],
        context_lens=list(_PROMPTS),
        block_tables=padded,
        num_decodes=0,
        logit_rows=[_PROMPTS[0] - 1, sum(_PROMPTS) - 1],
    )
    more = range(_PROMPTS[1], _PROMPTS[1] + _CONTINUE)
    mixed = StepInputs(
        token_ids=[1] * (1 + _CONTINUE),
        positions=[_PROMPTS[0], *more],
        slots=slots(0, range(_PROMPTS[0], _PROMPTS[0] + 1)) + slots(1, more),
        query_start_loc=[0, 1, 1 + _CONTINUE],
        context_lens=[_PROMPTS[0] + 1, _PROMPTS[1] + _CONTINUE],
        block_tables=padded,
        num_decodes=1,
        logit_rows=[0, _CONTINUE],
    )
    return [first, mixed]


def warm_sampler(sampler: Sampler, logits: torch.Tensor) -> None:
    """Compile the sampler's Triton kernels for these logits' vocabulary, in their dtype and in
    float32 (rows with penalties are drawn from a float32 copy): rows split over programs (small
    batches) and whole (large ones), min-p's floor (truncation_triton.py's statistics), and unless
    the sampler sends those rows to the torch sort the top-k/top-p search, for batches with top-p
    rows, top-k rows and both (each its own compiled variant)."""
    if sampler.kernel is None:
        return
    rows = logits.shape[0]
    temperatures = [1.0] * rows
    searches = [(50, 1.0), (0, 0.9), (50, 0.9)] if sampler.truncating else []  # (top_k, top_p)
    for x in dict.fromkeys([logits, logits.float()]):  # one of each dtype
        sampler.kernel(x, temperatures)
        sampler.kernel(x, temperatures, chunks=1)
        sampler.kernel(x, temperatures, filters=RowFilters([0] * rows, [1.0] * rows, [0.05] * rows))
        for k, p in searches:
            sampler.kernel(x, temperatures, filters=RowFilters([k] * rows, [p] * rows, [0.0] * rows))

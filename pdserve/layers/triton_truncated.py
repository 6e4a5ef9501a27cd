"""Top-k, top-p and min-p sampling of a whole batch in one Triton launch, without sorting.

The torch path sorts every row of [rows, vocab] logits, then softmax, cumsum, a scatter back and the
draw: ~3.6 ms a decode step at 128 rows of a 152k vocabulary on an H200 (7B: 10.75 vs 7.10 ms a step
with plain temperature sampling). Here one program per row searches for the cut instead of sorting.

With z = logits / T, a token i is kept by top-k iff fewer than k tokens have z_j > z_i, and by top-p
iff the probability mass of the tokens with z_j > z_i is below p (the torch path's "mass strictly
above" rule). Both tests only get easier as z_i grows, so the kept tokens are those at or above a cut
that is itself a token's value. The search keeps an interval (lo, hi] holding it (the test fails at
lo, holds at hi); each pass over the row tries CUTS values spread over the interval at once (how
many tokens lie above each, and their sum of exp(z - max)) and keeps the sub-interval where the test
turns, until only one token is left in it (2-4 passes on a 152k-vocabulary row; at most MAX_PASSES).
The tokens with z > lo are kept. min-p keeps z >= max + log(min_p) (p_i >= min_p * p_max, as the
torch path's test after its renormalization). The draw is the Gumbel-max over the kept tokens,
noise keyed like triton_sampler's. Before the search, one pass finds max, min and the softmax sum.

Ties at the cut are all kept (the torch path's sort breaks them arbitrarily); a temperature-0 row is
the plain argmax (no filter can remove it).

Measured on an H200 (benchmarks/sampler_gpu.py, 152k vocabulary, bf16 logits): min-p alone (no
search) 0.39-0.50 ms at 1-128 rows vs 0.40-0.90 ms for the torch path, so sampler.py always uses it
there; with top-p ~4.4 ms at 8-128 rows vs 0.8-3.7 ms for the torch sort, so top-k/top-p rows take it
only with PDSERVE_TRUNCATING_KERNEL=1. Likely causes, not yet measured apart: a row is one program
(one SM), and with bf16 logits many tokens tie at the cut, so (lo, hi] never shrinks to one token
and the search runs all MAX_PASSES passes.
"""

from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
BLOCK = 1024  # vocabulary entries per loop iteration (the cut tests are [BLOCK, CUTS] tiles)
CUTS = 16  # cut values tried per pass over a row: each pass narrows the interval 17-fold
MAX_PASSES = 12  # 17^12 > 2^49: the interval is then narrower than any two distinct fp32 values

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_max_min_sum(base, scale, VOCAB: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        """max z, min z and sum exp(z - max z) of one row, z = logits * scale: one pass, the sum
        rescaled whenever the running maximum grows (as online softmax does)."""
        zmax = tl.full((), -3.0e38, tl.float32)
        zmin = tl.full((), 3.0e38, tl.float32)
        total = tl.full((), 0.0, tl.float32)
        for start in range(0, VOCAB, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < VOCAB
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * scale
            new_max = tl.maximum(zmax, tl.max(tl.where(mask, z, -3.0e38), axis=0))
            zmin = tl.minimum(zmin, tl.min(tl.where(mask, z, 3.0e38), axis=0))
            total = total * tl.exp(zmax - new_max) + tl.sum(tl.where(mask, tl.exp(z - new_max), 0.0), axis=0)
            zmax = new_max
        return zmax, zmin, total

    @triton.jit
    def _above(base, scale, cuts, zmax, VOCAB: tl.constexpr, BLOCK: tl.constexpr, CUTS: tl.constexpr):  # type: ignore[no-untyped-def]
        """For each of the CUTS values: how many tokens of the row have z > cut, and their sum of
        exp(z - zmax). One pass over the row."""
        count = tl.zeros((CUTS,), tl.int32)
        mass = tl.zeros((CUTS,), tl.float32)
        for start in range(0, VOCAB, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < VOCAB
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * scale
            e = tl.where(mask, tl.exp(z - zmax), 0.0)
            above = (z[:, None] > cuts[None, :]) & mask[:, None]  # [BLOCK, CUTS]
            count += tl.sum(above.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
        return count, mass

    @triton.jit
    def _pick(values, i, CUTS: tl.constexpr):  # type: ignore[no-untyped-def]
        """values[i] of a [CUTS] vector (i a scalar in [0, CUTS))."""
        return tl.sum(tl.where(tl.arange(0, CUTS) == i, values, tl.zeros_like(values)), axis=0)

    @triton.jit(do_not_specialize=["seed", "rows"])
    def _truncated_kernel(  # type: ignore[no-untyped-def]
        logits_ptr, stride_row, params_ptr, rows, out_ptr, seed,
        VOCAB: tl.constexpr, BLOCK: tl.constexpr, CUTS: tl.constexpr, MAX_PASSES: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        inv_t = tl.load(params_ptr + row)  # params: [4, rows] = 1/T (0: greedy), k, p, min_p
        k = tl.load(params_ptr + rows + row)
        top_p = tl.load(params_ptr + 2 * rows + row)
        min_p = tl.load(params_ptr + 3 * rows + row)
        base = logits_ptr + row.to(tl.int64) * stride_row
        scale = tl.where(inv_t > 0, inv_t, 1.0)
        zmax, zmin, total = _row_max_min_sum(base, scale, VOCAB, BLOCK)
        # P(lo) false: every token is above it (when a filter is on). Floored, so that -inf logits
        # leave the cuts finite: what lies 1e4 below the maximum has probability 0 anyway.
        lo = tl.maximum(zmin, zmax - 1.0e4) - 1.0
        hi = zmax  # P(hi) true: nothing is above the maximum
        n_lo = tl.full((), VOCAB, tl.int32)  # tokens above lo, above hi
        n_hi = tl.full((), 0, tl.int32)
        search = (inv_t > 0) & ((k < VOCAB) | (top_p < 1.0))
        passes = tl.full((), 0, tl.int32)
        while search & (n_lo - n_hi > 1) & (passes < MAX_PASSES):  # done: one token left in (lo, hi]
            steps = (tl.arange(0, CUTS) + 1).to(tl.float32) / (CUTS + 1)
            cuts = lo + (hi - lo) * steps
            count, mass = _above(base, scale, cuts, zmax, VOCAB, BLOCK, CUTS)
            fails = tl.sum(((count.to(tl.float32) >= k) | (mass >= top_p * total)).to(tl.int32), axis=0)
            # P fails on the lowest `fails` cuts (it only gets easier upwards): the cut is above them
            if fails > 0:
                lo = _pick(cuts, fails - 1, CUTS)
                n_lo = _pick(count, fails - 1, CUTS)
            if fails < CUTS:
                hi = _pick(cuts, fails, CUTS)
                n_hi = _pick(count, fails, CUTS)
            passes += 1
        sampling = inv_t > 0  # a greedy row keeps every token: its argmax
        above = tl.where(sampling, lo, float("-inf"))  # kept: z > above (top-k, top-p)
        at_least = tl.where(sampling, zmax + tl.log(min_p), float("-inf"))  # and z >= it (min-p; 0: -inf)
        best = tl.full((), float("-inf"), tl.float32)
        best_i = tl.full((), 0, tl.int32)
        for start in range(0, VOCAB, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < VOCAB
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * scale
            u = tl.rand(seed, row * VOCAB + offs)
            gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-20)))
            score = tl.where(inv_t > 0, z + gumbel, z)
            score = tl.where(mask & (z > above) & (z >= at_least), score, float("-inf"))
            m = tl.max(score, axis=0)
            i = tl.argmax(score, axis=0) + start
            take = m > best
            best_i = tl.where(take, i, best_i)
            best = tl.where(take, m, best)
        tl.store(out_ptr + row, best_i.to(tl.int64))

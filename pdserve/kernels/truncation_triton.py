"""Where top-k and top-p cut each row of a batch of logits, with every row split over programs: a
search over the logits' own ordered bit patterns, a fixed number of short launches, no sort.

With z = logits / T, a token is kept by top-k iff fewer than k tokens have a larger z, and by top-p
iff the probability mass of the tokens with a larger z is below p (the torch path's "mass strictly
above" rule). Both only get easier as z grows, so the kept tokens are those whose logit is at least
some cut value. Logits are searched as keys: the bits of a float read as a signed integer whose
order is the floats' (16-bit for fp16/bf16, 32-bit for fp32), so the cut is the largest key u with
count(key >= u) >= k (top-k), or with mass(key >= u) >= p (top-p; mass: the sum of exp(z - max z)
over the softmax sum). Every pass splits each row's interval of candidate keys 17 ways: one launch
over (row, chunk) programs, each of which first narrows the interval to the piece where the test
turned in the pass before (from that pass's sums over the chunks), then counts and sums above the
new interval's 16 inner points. A 16-bit key range needs 4 passes, a 32-bit one 8; a row whose
interval holds one key skips the rest. Before the passes a launch over (row, chunk) finds the
statistics (max logit, softmax sum, key range), after them a launch per row keeps the last piece.
Tokens tied at the cut are all kept (torch's sort keeps those it happened to order first).

min-p keeps z >= max z + log(min_p) (p_i >= min_p * p_max), a floor found with the statistics, no
search. The draw itself is sampling_triton's plain kernel with the cut and the floor as per-row
bounds, so its noise is keyed by (row, index) as for plain rows. The torch reference
(kernels/sampling.py) sorts every row, a full sort of [rows, vocab] each decode step; this path is
2 + passes launches (2 for min-p alone), faster than the sort at every batch size measured
(docs/performance.md). The engine's Sampler sends top-k/top-p rows here unless the KernelConfig's
truncating_sampler is off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CUTS = 16  # inner points tried per pass: each pass keeps one of 17 pieces of the interval
COUNT_BLOCK = 128  # entries a [CUTS, COUNT_BLOCK] tile of a pass holds: one a thread at 4 warps
_FLOOR = tl.constexpr(-3.0e38)  # a finite "minus infinity": -inf logits must not turn sums into NaN
_NO_KEY = tl.constexpr(-(2**31))  # the lowest int32 key (a -NaN's): below every point a pass tries
_ALL_KEYS = tl.constexpr(2**31 - 1)  # the highest int32 key


@triton.jit
def ordered_key(raw):  # type: ignore[no-untyped-def]
    """The bits of raw (fp32, or a 16-bit float) as an int32 ordered like the floats themselves."""
    if raw.dtype.primitive_bitwidth == 32:
        bits = raw.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    else:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        key = bits ^ ((bits >> 15) & 0x7FFF)
    return key


@triton.jit(do_not_specialize=["span", "num_chunks"])
def _stats_kernel(  # type: ignore[no-untyped-def]
    logits_ptr, stride_row, params_ptr, part_f_ptr, part_k_ptr, span, num_chunks,
    VOCAB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per (row, chunk): max logit, sum exp((x - max) / T), min and max key -> the partials. Each
    lane keeps its own running values (an online softmax per lane); they are reduced once, at the
    end, not every iteration."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_t = tl.load(params_ptr + row)
    scale = tl.where(inv_t > 0, inv_t, 1.0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    x_max = tl.full([BLOCK], _FLOOR, tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    k_min = tl.full([BLOCK], _ALL_KEYS, tl.int32)
    k_max = tl.full([BLOCK], _NO_KEY, tl.int32)
    lo = chunk * span
    end = tl.minimum(lo + span, VOCAB)
    for start in range(lo, lo + span, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        raw = tl.load(base + offs, mask=mask, other=0.0)
        x = tl.where(mask, tl.maximum(raw.to(tl.float32), _FLOOR), _FLOOR)
        new_max = tl.maximum(x_max, x)
        e = tl.where(mask, tl.exp((x - new_max) * scale), 0.0)
        total = total * tl.exp((x_max - new_max) * scale) + e
        x_max = new_max
        key = ordered_key(raw)
        k_min = tl.minimum(k_min, tl.where(mask, key, _ALL_KEYS))
        k_max = tl.maximum(k_max, tl.where(mask, key, _NO_KEY))
    top = tl.max(x_max, axis=0)
    at = row * num_chunks + chunk
    tl.store(part_f_ptr + 2 * at, top)
    tl.store(part_f_ptr + 2 * at + 1, tl.sum(total * tl.exp((x_max - top) * scale), axis=0))
    tl.store(part_k_ptr + 2 * at, tl.min(k_min, axis=0).to(tl.int64))
    tl.store(part_k_ptr + 2 * at + 1, tl.max(k_max, axis=0).to(tl.int64))


@triton.jit
def _from_stats(  # type: ignore[no-untyped-def]
    row, params_ptr, rows, part_f_ptr, part_k_ptr, num_chunks, VOCAB: tl.constexpr, BLOCK_C: tl.constexpr
):
    """A row's max logit, softmax sum and min-p's floor on z, and each search's first interval
    [lo, hi) of keys, from the statistics' partials; a search that is off starts done."""
    inv_t = tl.load(params_ptr + row)
    k = tl.load(params_ptr + rows + row)
    top_p = tl.load(params_ptr + 2 * rows + row)
    min_p = tl.load(params_ptr + 3 * rows + row)
    scale = tl.where(inv_t > 0, inv_t, 1.0)
    c = tl.arange(0, BLOCK_C)
    at = row * num_chunks + c
    here = c < num_chunks
    maxes = tl.load(part_f_ptr + 2 * at, mask=here, other=_FLOOR)
    x_max = tl.max(maxes, axis=0)
    sums = tl.load(part_f_ptr + 2 * at + 1, mask=here, other=0.0)
    total = tl.sum(sums * tl.exp((maxes - x_max) * scale), axis=0)
    k_min = tl.min(tl.load(part_k_ptr + 2 * at, mask=here, other=2**62), axis=0)
    k_max = tl.max(tl.load(part_k_ptr + 2 * at + 1, mask=here, other=-(2**62)), axis=0)
    sampling = inv_t > 0
    floor = tl.where(sampling & (min_p > 0), x_max * scale + tl.log(tl.maximum(min_p, 1e-30)), _FLOOR)
    hi_p = tl.where(sampling & (top_p < 1.0), k_max + 1, k_min + 1)
    hi_k = tl.where(sampling & (k < VOCAB), k_max + 1, k_min + 1)
    return x_max, total, floor, k_min, hi_p, k_min, hi_k


@triton.jit
def _enter_pass(  # type: ignore[no-untyped-def]
    p, row, chunk, params_ptr, rows, part_f_ptr, part_k_ptr, part_mass_ptr, part_count_ptr,
    state_f_ptr, state_k_ptr, num_chunks, VOCAB: tl.constexpr, BLOCK_C: tl.constexpr,
    CUTS: tl.constexpr, TOP_P: tl.constexpr, TOP_K: tl.constexpr,
):  # fmt: skip
    """A row's max logit and intervals for pass p: pass 0's from the statistics, pass p's by
    narrowing pass p - 1's with its sums over the chunks. Every program of the row works them out
    (a few hundred loads) instead of a launch per row between passes; chunk 0's program stores
    them for the next pass and the draw: state_f (max, sum, floor) in pass 0, the intervals in
    state slot p % 2, so no program reads what another of its launch writes. The sums of pass
    p - 1 are in partial slot (p - 1) % 2 (each pass writes slot p % 2)."""
    slot_k = state_k_ptr + 4 * row
    if p == 0:
        x_max, total, floor, lo_p, hi_p, lo_k, hi_k = _from_stats(
            row, params_ptr, rows, part_f_ptr, part_k_ptr, num_chunks, VOCAB, BLOCK_C
        )
        if chunk == 0:
            tl.store(state_f_ptr + 3 * row, x_max)
            tl.store(state_f_ptr + 3 * row + 1, total)
            tl.store(state_f_ptr + 3 * row + 2, floor)
    else:
        x_max = tl.load(state_f_ptr + 3 * row)
        before = slot_k + ((p - 1) % 2) * 4 * rows
        lo_p, hi_p = tl.load(before), tl.load(before + 1)
        lo_k, hi_k = tl.load(before + 2), tl.load(before + 3)
        c = tl.arange(0, BLOCK_C)
        at = ((p - 1) % 2) * rows * num_chunks * CUTS
        at += (row * num_chunks + c)[:, None] * CUTS + tl.arange(0, CUTS)[None, :]
        here = (c < num_chunks)[:, None]
        if TOP_P:  # a row not live in pass p - 1 wrote no sums: _narrowed leaves its interval
            mass = tl.sum(tl.load(part_mass_ptr + at, mask=here, other=0.0), axis=0)
            top_p = tl.load(params_ptr + 2 * rows + row)
            total = tl.load(state_f_ptr + 3 * row + 1)
            lo_p, hi_p = _narrowed(lo_p, hi_p, mass >= top_p * total, CUTS)
        if TOP_K:
            count = tl.sum(tl.load(part_count_ptr + at, mask=here, other=0), axis=0)
            k = tl.load(params_ptr + rows + row)
            lo_k, hi_k = _narrowed(lo_k, hi_k, count.to(tl.float32) >= k, CUTS)
    if chunk == 0:
        now = slot_k + (p % 2) * 4 * rows
        tl.store(now, lo_p)
        tl.store(now + 1, hi_p)
        tl.store(now + 2, lo_k)
        tl.store(now + 3, hi_k)
    return x_max, lo_p, hi_p, lo_k, hi_k


@triton.jit
def _points(lo, hi, CUTS: tl.constexpr):  # type: ignore[no-untyped-def]
    """The 16 inner points of [lo, hi) cut 17 ways, and which of them lie inside it."""
    step = (hi - lo + CUTS) // (CUTS + 1)  # ceil((hi - lo) / 17), at least 1 for a live interval
    points = lo + (tl.arange(0, CUTS) + 1).to(tl.int64) * step
    return points, points < hi


@triton.jit
def _tally(  # type: ignore[no-untyped-def]
    raw, mask, x_max, scale, points_p, points_k, mass, count, TOP_P: tl.constexpr, TOP_K: tl.constexpr
):
    """Add BLOCK entries (raw, mask) to the [CUTS, BLOCK] tiles: mass at or above top-p's points,
    count at or above top-k's. Entries run along the tiles' last dimension, so each thread holds
    the cuts of its own entries: the loaded layout is the tile's, no exchange through shared memory
    and no entry's exp computed by several threads ([BLOCK, CUTS] tiles had both, each iteration)."""
    key = tl.where(mask, ordered_key(raw), _NO_KEY)
    if TOP_P:
        x = tl.maximum(raw.to(tl.float32), _FLOOR)
        e = tl.where(mask, tl.exp((x - x_max) * scale), 0.0)
        mass += tl.where(key[None, :] >= points_p[:, None], e[None, :], 0.0)
    if TOP_K:
        count += (key[None, :] >= points_k[:, None]).to(tl.int32)
    return mass, count


@triton.jit(do_not_specialize=["p", "rows", "span", "num_chunks"])
def _count_kernel(  # type: ignore[no-untyped-def]
    logits_ptr, stride_row, p, params_ptr, rows, part_f_ptr, part_k_ptr, state_f_ptr, state_k_ptr,
    part_mass_ptr, part_count_ptr, span, num_chunks, VOCAB: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, CUTS: tl.constexpr, TOP_P: tl.constexpr, TOP_K: tl.constexpr,
):  # fmt: skip
    """Pass p, per (row, chunk): the row's intervals for this pass (_enter_pass), then the mass at
    or above each of top-p's points and the count at or above each of top-k's, summed over the
    chunk's entries -> partial slot p % 2 (TOP_P / TOP_K: whether any row of the batch searches
    that cut; the other partial is neither computed nor written). [CUTS, BLOCK] tiles accumulate
    elementwise and are reduced once after the loop (a reduction across warps every iteration cost
    more than the comparisons); each iteration loads four blocks before tallying them, so more
    bytes are in flight than one block of a program holds."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    x_max, lo_p, hi_p, lo_k, hi_k = _enter_pass(
        p, row, chunk, params_ptr, rows, part_f_ptr, part_k_ptr, part_mass_ptr, part_count_ptr,
        state_f_ptr, state_k_ptr, num_chunks, VOCAB, BLOCK_C, CUTS, TOP_P, TOP_K,
    )  # fmt: skip
    if (hi_p - lo_p > 1) | (hi_k - lo_k > 1):  # else both searches are done: nothing is read
        inv_t = tl.load(params_ptr + row)
        scale = tl.where(inv_t > 0, inv_t, 1.0)
        points_p = _points32(lo_p, hi_p, CUTS)
        points_k = _points32(lo_k, hi_k, CUTS)
        mass = tl.zeros([CUTS, BLOCK], tl.float32)
        count = tl.zeros([CUTS, BLOCK], tl.int32)
        base = logits_ptr + row.to(tl.int64) * stride_row
        lo = chunk * span
        end = tl.minimum(lo + span, VOCAB)
        for start in range(lo, lo + span, 4 * BLOCK):
            o0 = start + tl.arange(0, BLOCK)
            o1, o2, o3 = o0 + BLOCK, o0 + 2 * BLOCK, o0 + 3 * BLOCK
            r0 = tl.load(base + o0, mask=o0 < end, other=0.0)
            r1 = tl.load(base + o1, mask=o1 < end, other=0.0)
            r2 = tl.load(base + o2, mask=o2 < end, other=0.0)
            r3 = tl.load(base + o3, mask=o3 < end, other=0.0)
            mass, count = _tally(r0, o0 < end, x_max, scale, points_p, points_k, mass, count, TOP_P, TOP_K)
            mass, count = _tally(r1, o1 < end, x_max, scale, points_p, points_k, mass, count, TOP_P, TOP_K)
            mass, count = _tally(r2, o2 < end, x_max, scale, points_p, points_k, mass, count, TOP_P, TOP_K)
            mass, count = _tally(r3, o3 < end, x_max, scale, points_p, points_k, mass, count, TOP_P, TOP_K)
        at = (p % 2) * rows * num_chunks * CUTS + (row * num_chunks + chunk) * CUTS + tl.arange(0, CUTS)
        if TOP_P:
            tl.store(part_mass_ptr + at, tl.sum(mass, axis=1))
        if TOP_K:
            tl.store(part_count_ptr + at, tl.sum(count, axis=1))


@triton.jit
def _points32(lo, hi, CUTS: tl.constexpr):  # type: ignore[no-untyped-def]
    """_points as int32 keys for the comparisons (int64 ones take twice the instructions); points
    past hi, which no pass reads, are clamped into range."""
    points, _ = _points(lo, hi, CUTS)
    return tl.minimum(points, _ALL_KEYS).to(tl.int32)


@triton.jit
def _narrowed(lo, hi, reached, CUTS: tl.constexpr):  # type: ignore[no-untyped-def]
    """The piece of [lo, hi) where the test turns: `reached` holds at the lowest points (a prefix of
    the points inside the interval), so the new lo is the last of them, the new hi the next point."""
    points, inside = _points(lo, hi, CUTS)
    held = tl.sum((reached & inside).to(tl.int32), axis=0)
    j = tl.arange(0, CUTS)
    last = tl.max(tl.where(j == held - 1, points, lo), axis=0)
    following = tl.min(tl.where((j == held) & inside, points, hi), axis=0)
    live = hi - lo > 1
    return tl.where(live, last, lo), tl.where(live, following, hi)


@triton.jit(do_not_specialize=["p", "rows", "num_chunks"])
def _finish_kernel(  # type: ignore[no-untyped-def]
    p, params_ptr, rows, part_f_ptr, part_k_ptr, state_f_ptr, state_k_ptr, part_mass_ptr,
    part_count_ptr, num_chunks, VOCAB: tl.constexpr, BLOCK_C: tl.constexpr, CUTS: tl.constexpr,
    TOP_P: tl.constexpr, TOP_K: tl.constexpr,
):  # fmt: skip
    """Per row, after the last pass (p: the number of passes, even): the intervals it leaves, into
    state slot 0 (with no pass, p = 0: the statistics alone, all min-p needs)."""
    _enter_pass(
        p, tl.program_id(0), 0, params_ptr, rows, part_f_ptr, part_k_ptr, part_mass_ptr,
        part_count_ptr, state_f_ptr, state_k_ptr, num_chunks, VOCAB, BLOCK_C, CUTS, TOP_P, TOP_K,
    )  # fmt: skip


def passes(dtype: torch.dtype) -> int:
    """Passes that narrow any key range of this dtype to one key: 17^4 > 2^16, 17^8 > 2^32."""
    return 4 if dtype.itemsize == 2 else 8


def search_cuts(
    logits: torch.Tensor, params: torch.Tensor, chunks: int, span: int, block: int,
    top_p: bool = True, top_k: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Queue the search for logits [rows, vocab] (params: [4, rows] float32 = 1/T (0: greedy), k
    (vocab: off), p (1: off), min_p) over `chunks` programs a row of `span` entries each. top_p /
    top_k: whether any row has that filter; with neither, only the statistics min-p needs. Returns
    the per-row state the draw reads: float32 [rows, 3] (max logit, softmax sum, min-p's floor on
    z = logits / T) and int64 [rows, 4] (lo_p, hi_p, lo_k, hi_k: the kept keys are those >=
    max(lo_p, lo_k))."""
    rows, vocab = logits.shape
    dev = logits.device
    part_f = torch.empty((rows, chunks, 2), dtype=torch.float32, device=dev)
    part_k = torch.empty((rows, chunks, 2), dtype=torch.int64, device=dev)
    state_f = torch.empty((rows, 3), dtype=torch.float32, device=dev)
    state_k = torch.empty((2, rows, 4), dtype=torch.int64, device=dev)  # slots of even, odd passes
    sums = (2, rows, chunks, CUTS)  # slots of even, odd passes
    part_mass = torch.empty(sums, dtype=torch.float32, device=dev)
    part_count = torch.empty(sums, dtype=torch.int32, device=dev)
    block_c = max(16, triton.next_power_of_2(chunks))
    grid = (rows, chunks)
    _stats_kernel[grid](logits, logits.stride(0), params, part_f, part_k, span, chunks,
                        VOCAB=vocab, BLOCK=block)  # fmt: skip
    shared = (params, rows, part_f, part_k, state_f, state_k, part_mass, part_count, chunks)
    flags = dict(VOCAB=vocab, BLOCK_C=block_c, CUTS=CUTS, TOP_P=top_p, TOP_K=top_k)
    count_block = max(1, min(block // 4, COUNT_BLOCK))  # an iteration's four tiles divide span
    done = passes(logits.dtype) if top_p or top_k else 0
    for p in range(done):
        _count_kernel[grid](logits, logits.stride(0), p, params, rows, part_f, part_k, state_f, state_k,
                            part_mass, part_count, span, chunks, BLOCK=count_block, **flags)  # fmt: skip
    _finish_kernel[(rows,)](done, *shared, **flags)
    return state_f, state_k[0]

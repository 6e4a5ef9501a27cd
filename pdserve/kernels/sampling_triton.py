"""Greedy and temperature sampling of a whole batch in one Triton launch: the Triton implementation
of kernels/sampling.py's operation (its torch reference is sample_reference there).

The torch reference costs a dozen kernels a step (fp32 copy, clone, argmax, temperature division,
softmax, uniform noise, log, division, argmax, scatter), each a full pass over [rows, vocab] logits
and a host launch, so at decode batch sizes the GPU mostly waits for Python. Rows whose requests ask
for nothing else (no penalties, top-k/top-p/min-p, min_tokens bans, seed or logprobs) need only:
token = argmax(logits / T + Gumbel noise), which draws from softmax(logits / T) (the Gumbel-max
trick); T = 0 is the plain argmax. Each row is cut into chunks, one program each (enough programs
for several waves over the SMs: choose_chunks), which read their logits once, in the input dtype,
and keep a running best; a second tiny launch picks each row's best chunk. The noise is Philox
(tl.randint4x, four numbers a call) keyed by a per-call seed and the element's (row, index), so the
draw does not depend on the chunking. With top-k, top-p or min-p the same kernel keeps only the
entries at or above each row's cut and min-p floor, found first by truncation_triton.py (a search
over the rows' keys, rows split over programs the same way, instead of a sort).

This module imports triton: only a Sampler built with Triton chosen (engine/sampler.py) or a test
that sets TRITON_INTERPRET first imports it.
"""

from __future__ import annotations

import random

import torch
import triton
import triton.language as tl

from pdserve.host_tensors import to_device
from pdserve.kernels.pdl import launch_options
from pdserve.kernels.sampling import RowFilters
from pdserve.kernels.sm_count import num_sms
from pdserve.kernels.triton_pdl import wait_prior
from pdserve.kernels.truncation_triton import ordered_key, search_cuts

_CHUNK_BLOCK = 1024  # vocabulary entries per loop iteration of a chunk
_MIN_CHUNK = 2048  # vocabulary entries a chunk gets at least
_PICK_BLOCK = 64  # chunks the pick kernel reads at least: one compiled variant for every batch size
PROGRAMS_PER_SM = 8  # choose_chunks' aim: programs of all rows together per SM (docs/performance.md)


@triton.jit
def _keep_better(  # type: ignore[no-untyped-def]
    base, start, end, bits, inv_t, best, best_i, cut, floor, QUARTER: tl.constexpr, HAS_CUT: tl.constexpr
):
    """Entries [start, + QUARTER) of a row (`bits`: their noise) against the running best score
    and index per lane: a lane sees its entries in rising order and keeps the first maximum.
    HAS_CUT: only entries whose key is >= cut and whose logit / T is >= floor (truncation_triton.py)."""
    offs = start + tl.arange(0, QUARTER)
    mask = offs < end
    raw = tl.load(base + offs, mask=mask, other=-3.0e38)
    x = raw.to(tl.float32)  # finite where masked: x * 0 is no NaN
    if HAS_CUT:
        mask = mask & (ordered_key(raw) >= cut) & (x * inv_t >= floor)
    u = tl.uint_to_uniform_float(bits)  # [0, 1)
    gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-20)))
    score = tl.where(mask, tl.where(inv_t > 0, x * inv_t + gumbel, x), float("-inf"))
    take = score > best
    return tl.where(take, score, best), tl.where(take, offs, best_i)


@triton.jit(do_not_specialize=["seed", "span", "num_chunks"])
def _sample_kernel(  # type: ignore[no-untyped-def]
    logits_ptr, stride_row, inv_temp_ptr, out_ptr, part_score_ptr, part_index_ptr, seed, span,
    num_chunks, state_f_ptr, state_k_ptr, VOCAB: tl.constexpr, BLOCK: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, HAS_CUT: tl.constexpr = False, PDL: tl.constexpr = False,
):  # fmt: skip
    """The best (score, index) of one chunk [chunk * span, + span) of one row: the token itself
    when the row is one chunk, else a partial for _pick_chunk_kernel. One Philox call gives four
    numbers, one for each quarter of a block (a call per number made the noise the kernel's main
    cost); the best is kept per lane, reduced once."""
    wait_prior(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)  # 0: greedy
    base = logits_ptr + row.to(tl.int64) * stride_row
    cut = tl.full((), 0, tl.int64)
    floor = tl.full((), 0.0, tl.float32)
    if HAS_CUT:  # truncation_triton.search_cuts' per-row state: keys >= max(lo_p, lo_k), z >= floor
        cut = tl.maximum(tl.load(state_k_ptr + 4 * row), tl.load(state_k_ptr + 4 * row + 2))
        floor = tl.load(state_f_ptr + 3 * row + 2)
    Q: tl.constexpr = BLOCK // 4
    best = tl.full([Q], float("-inf"), tl.float32)
    best_i = tl.zeros([Q], dtype=tl.int32)
    lo = chunk * span
    end = tl.minimum(lo + span, VOCAB)
    for step in range(0, span, BLOCK):
        start = lo + step  # a multiple of BLOCK: the noise of an entry is the same in any chunking
        n0, n1, n2, n3 = tl.randint4x(seed, row * VOCAB + start // 4 + tl.arange(0, Q))
        q1, q2, q3 = start + Q, start + 2 * Q, start + 3 * Q
        best, best_i = _keep_better(base, start, end, n0, inv_t, best, best_i, cut, floor, Q, HAS_CUT)
        best, best_i = _keep_better(base, q1, end, n1, inv_t, best, best_i, cut, floor, Q, HAS_CUT)
        best, best_i = _keep_better(base, q2, end, n2, inv_t, best, best_i, cut, floor, Q, HAS_CUT)
        best, best_i = _keep_better(base, q3, end, n3, inv_t, best, best_i, cut, floor, Q, HAS_CUT)
    top = tl.max(best, axis=0)
    top_i = tl.min(tl.where(best == top, best_i, VOCAB), axis=0)  # the first index of the maxima
    if SINGLE_CHUNK:
        tl.store(out_ptr + row, top_i.to(tl.int64))
    else:
        tl.store(part_score_ptr + row * num_chunks + chunk, top)
        tl.store(part_index_ptr + row * num_chunks + chunk, top_i)


@triton.jit
def _pick_chunk_kernel(  # type: ignore[no-untyped-def]
    part_score_ptr, part_index_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False
):
    """Per row, the index of the best chunk's best token (the first chunk of equal scores: the
    lower index, as torch.argmax)."""
    wait_prior(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    scores = tl.load(part_score_ptr + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    best = tl.argmax(scores, axis=0)
    tl.store(out_ptr + row, tl.load(part_index_ptr + row * num_chunks + best).to(tl.int64))


def next_seed() -> int:
    """A fresh 31-bit Philox seed per call (seeded requests do not come here)."""
    return random.getrandbits(31)


def triton_sample(
    logits: torch.Tensor,
    temperatures: list[float],
    seed: int | None = None,
    filters: RowFilters | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """One token id per row of logits [rows, vocab] (any float dtype, rows contiguous in the last dim):
    argmax for temperature 0, else a draw from softmax(logits / temperature), truncated by `filters`
    (top-k, top-p, min-p per row; truncation_triton.py finds where they cut first) when given. Returns int64
    [rows]. `chunks` (a power of two): programs per row, chosen by choose_chunks when None; the draw
    does not depend on it."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and len(temperatures) == rows
    assert rows * vocab < 2**31, "Philox offsets are 32-bit"
    params = [1.0 / t if t > 0 else 0.0 for t in temperatures]
    if filters is not None:
        params += [float(min(k, vocab) if k > 0 else vocab) for k in filters.top_k]
        params += filters.top_p + filters.min_p
    on_device = to_device(torch.tensor(params, dtype=torch.float32), logits.device)  # queued, no wait
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    seed = next_seed() if seed is None else seed
    chunks = chunks or choose_chunks(rows, vocab, logits.device)
    _plain_sample(logits, on_device, out, seed, chunks, filters)
    return out


def choose_chunks(rows: int, vocab: int, device: torch.device) -> int:
    """Programs per row for the plain kernel, a power of two: enough for PROGRAMS_PER_SM programs
    an SM, none shorter than _MIN_CHUNK entries. With one program per row, a small batch would read
    each 152k-entry row on one SM while the others idle."""
    wanted = -(-PROGRAMS_PER_SM * num_sms(device) // max(rows, 1))
    chunks = 1
    while chunks < wanted and vocab // (2 * chunks) >= _MIN_CHUNK:
        chunks *= 2
    return chunks


def _plain_sample(
    logits: torch.Tensor, params: torch.Tensor, out: torch.Tensor, seed: int, chunks: int,
    filters: RowFilters | None = None,
) -> None:  # fmt: skip
    """Grid (rows, chunks), then one pick per row when chunks > 1. With filters each row's min-p
    floor, and where top-k/top-p are on their cut, are found first (truncation_triton.py; params [4, rows]),
    else params is 1/T [rows]."""
    rows, vocab = logits.shape
    block = max(4, min(_CHUNK_BLOCK, triton.next_power_of_2(vocab)))  # four quarters of one at least
    span = -(-vocab // (chunks * block)) * block  # whole loop iterations per chunk
    chunks = -(-vocab // span)  # rounding may leave fewer chunks with work; the grid has no empty ones
    scores = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device) if chunks > 1 else out
    indices = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device) if chunks > 1 else out
    state_f, state_k = (logits, logits)  # unread without filters
    if filters is not None:
        top_p, top_k = filters.cuts_top_p(), filters.cuts_top_k()
        state_f, state_k = search_cuts(logits, params, chunks, span, block, top_p, top_k)
    _sample_kernel[(rows, chunks)](
        logits, logits.stride(0), params, out, scores, indices, seed, span, chunks, state_f, state_k,
        VOCAB=vocab, BLOCK=block, SINGLE_CHUNK=chunks == 1, HAS_CUT=filters is not None,
        num_warps=4, **launch_options(logits),
    )  # fmt: skip
    if chunks > 1:
        block_c = max(_PICK_BLOCK, triton.next_power_of_2(chunks))
        _pick_chunk_kernel[(rows,)](
            scores, indices, out, chunks, BLOCK_C=block_c, num_warps=1, **launch_options(logits)
        )

"""Which kernel runs a quantized product x @ W^T at M rows of x, and its tiles (pure Python, no triton).

    M <= SKINNY_MAX_ROWS (128)  the weight-streaming kernel (triton_wquant_skinny.py): every weight
                                row crosses memory once whatever M; plan() picks BLOCK_N and the K
                                split so that the grid fills the SMs. Up to 128 rows its accumulator
                                ([BLOCK_N, 128] float32) still fits the registers; decode at B <= 128
    M >= DEQUANT_MIN_ROWS (1024)  prefill: the weight dequantized to x's dtype once, into a scratch
                                buffer, then cuBLAS (F.linear). Past ~1k rows the GEMM is compute bound
                                (7B gate_up at 8k tokens: ~3 ms of tensor-core time) and the extra
                                pass (read 0.5-1 byte, write 2 bytes an element: ~0.1 ms for gate_up
                                at 3 TB/s) costs a few percent, against a Triton tile that dequantizes
                                in its inner loop and loses to cuBLAS by more
    in between                  triton_wquant.py's tile kernel (weight dequantized in registers)

fp8 takes the skinny kernel weight-only (no activation quantization) up to FP8_SKINNY_MAX_ROWS and
torch._scaled_mm (kernels/fp8.py) past it, where the fp8 tensor cores pay.

plan(): a program must keep enough weight bytes in flight to pull its SM's share of the bandwidth
(Little's law: ~25 GB/s x ~1 us of latency per SM on an H100), so a step's weight tile is at least
MIN_STAGE_BYTES (x 4 stages); among those widths the candidates (BLOCK_N, SPLIT) are scored by a
wave model: each program streams BLOCK_N x K/SPLIT weight elements, reads its x span from L2 (a
third of the weight's cost a byte) and pays a ramp (its first loads' latency); the time is waves x
one program's cost, plus the partials a split writes and reads. PLANS
overrides it for measured shapes (benchmarks/quant_gpu.py --sweep prints entries for it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

GROUP = 128  # wint4 inputs per scale (layers/quant.py WINT4_GROUP)
FORMATS = ("wint8", "wint4", "fp8")  # the kernels' FMT codes are the indices
SKINNY_MAX_ROWS = 128
FP8_SKINNY_MAX_ROWS = 16  # past this the fp8 tensor cores (activations quantized) win
DEQUANT_MIN_ROWS = 1024
WIDTHS = (16, 32, 64, 128, 256)
MAX_SPLIT = 16
MIN_SPAN = 512  # K per program at least
MIN_STAGE_BYTES = 8192  # weight bytes a K step loads at least
RAMP_BYTES = 16 << 10  # a program's start (its first loads' latency), as bytes of streaming
SPLIT_COST_BYTES = 64 << 10  # a split's second launch, counted as this many bytes of streaming
_WEIGHT_BYTES = {"wint8": 1.0, "wint4": 0.5, "fp8": 1.0}


@dataclass(frozen=True)
class SkinnyPlan:
    """Tiles of one skinny launch: BLOCK_N weight rows a program, `span` inputs of K a program (a
    multiple of GROUP; K / span rounded up = the split), BLOCK_K a step, dot: tensor cores (M > 1)."""

    block_n: int
    span: int
    block_k: int
    stages: int
    warps: int
    dot: bool
    prefetch: bool = True  # the next K step's weight loaded a step ahead, into registers (see prefetch())


# (format, N, K) -> ((up to rows, plan), ...), measured shapes only
PLANS: dict[tuple[str, int, int], tuple[tuple[int, SkinnyPlan], ...]] = {}


def route(fmt: str, rows: int) -> str:
    """ "skinny", "tiles", "dequant" (wint) or "scaled_mm" (fp8) for `rows` rows of x."""
    if fmt == "fp8":
        return "skinny" if rows <= FP8_SKINNY_MAX_ROWS else "scaled_mm"
    if rows <= SKINNY_MAX_ROWS:
        return "skinny"
    return "dequant" if rows >= DEQUANT_MIN_ROWS else "tiles"


def block_k(fmt: str, rows: int) -> int:
    """K per step: 128 for wint4 (one group a step) or past 32 rows (x's tile grows with the rows)."""
    return 128 if fmt == "wint4" or rows > 32 else 256


def plan(fmt: str, n: int, k: int, rows: int, sms: int) -> SkinnyPlan:
    """The skinny kernel's tiles for W [N, K] in `fmt` at `rows` rows of x on `sms` SMs."""
    for up_to, measured in PLANS.get((fmt, n, k), ()):
        if rows <= up_to:
            return measured
    return _modelled(fmt, n, k, rows, sms)


@functools.lru_cache(maxsize=4096)
def _modelled(fmt: str, n: int, k: int, rows: int, sms: int) -> SkinnyPlan:
    """plan() where PLANS has no entry: the wave model's best (cached: it runs at every product
    outside a CUDA graph)."""
    step = block_k(fmt, rows)
    padded = max(16, 1 << (rows - 1).bit_length())
    # registers: the [BN, BM] float32 accumulator and the converted [BN, BK] weight tile (float32
    # at one row, where it is multiplied on the CUDA cores)
    tile_max = 16384 if rows <= 1 else 32768
    fits = [w for w in WIDTHS if (w * padded <= 8192 and w * step <= tile_max) or w == WIDTHS[0]]
    deep = [w for w in fits if w * step * _WEIGHT_BYTES[fmt] >= MIN_STAGE_BYTES] or fits[-1:]
    best: tuple[float, int, int] | None = None
    for width in deep:
        for split in range(1, MAX_SPLIT + 1):
            span = split_span(k, split)
            if split > 1 and (span < MIN_SPAN or -(-k // span) != split):
                continue
            cost = _cost(fmt, n, k, rows, sms, width, span)
            if best is None or cost < best[0]:
                best = (cost, width, span)
    assert best is not None
    _, width, span = best
    warps = 8 if width * step >= 16384 else 4
    return SkinnyPlan(width, span, step, 3 if padded >= 64 else 4, warps, rows > 1, prefetch(fmt, rows > 1))


def prefetch(fmt: str, dot: bool) -> bool:
    """Whether the kernel loads the next step's weight a step ahead itself: where Triton's pipeliner
    does not stage the weight through shared memory (cp.async) -- loads that no dot consumes (one
    row) and wint4's unpacked bytes (checked in the PTX for sm_90); wint8 / fp8 tiles feeding a dot
    are pipelined num_stages deep by Triton."""
    return not dot or fmt == "wint4"


def split_span(k: int, split: int) -> int:
    """K / split rounded up to a multiple of GROUP."""
    per_split = -(-k // split)
    return -(-per_split // GROUP) * GROUP


def _cost(fmt: str, n: int, k: int, rows: int, sms: int, width: int, span: int) -> float:
    """Modelled time in streamed bytes: waves x one program's weight and x bytes, plus the split's
    partials (written, then read) and its second launch."""
    split = -(-k // span)
    programs = -(-n // width) * split
    waves = -(-programs // sms)
    per_program = span * (width * _WEIGHT_BYTES[fmt] + rows * 2 / 3)
    extra = 0.0 if split == 1 else SPLIT_COST_BYTES + 2 * split * rows * n * 4 / sms
    return waves * (per_program + RAMP_BYTES) + extra

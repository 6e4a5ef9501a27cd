"""The token masks of a step's constrained rows: filled on the host, one bitmask row per constrained
request (while the GPU runs the step's forward, queued before the sampler is called), copied to the
device behind that forward without waiting for it, and applied there: every disallowed token's logit
becomes -inf. Free rows are left alone, so a batch mixes constrained and free requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pdserve.host_tensors import list_on, to_device

if TYPE_CHECKING:
    from pdserve.engine.request import Request


def constrained_rows(requests: Sequence[Request]) -> list[int]:
    return [i for i, r in enumerate(requests) if r.matcher is not None and r.matcher.constrains]


def host_bitmask(requests: Sequence[Request], rows: list[int], vocab: int) -> torch.Tensor:
    """[len(rows), ceil(vocab / 32)] int32 on the host: bit t of row j allows token t for rows[j].
    Row by row: with a Qwen vocabulary a row costs tens of microseconds, and xgrammar's threaded
    BatchGrammarMatcher measured slower than this loop on an H100 host (docs/benchmarks.md)."""
    bitmask = torch.zeros((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    for j, i in enumerate(rows):
        matcher = requests[i].matcher
        assert matcher is not None
        matcher.fill(bitmask, j)
    return bitmask


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """logits [num_rows, vocab] (float32, modified in place): rows[j]'s tokens outside bitmask[j]
    get -inf. Unpacked on the logits' device: [n, words, 32] bits -> [n, vocab] allowed."""
    dev = logits.device
    vocab = logits.shape[1]
    words = to_device(bitmask, dev)
    allowed = (
        ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=dev)) & 1).bool().flatten(1)
    )  # [n, words * 32]
    if allowed.shape[1] < vocab:  # tokens past the grammar's vocabulary are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    idx = list_on(rows, dev)
    logits[idx] = logits[idx].masked_fill(~allowed[:, :vocab], float("-inf"))


def apply_grammars(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Mask the constrained rows of `logits` (a float32 copy the sampler owns) in place."""
    rows = constrained_rows(requests)
    if rows:
        matcher = requests[rows[0]].matcher
        assert matcher is not None
        apply_bitmask(logits, rows, host_bitmask(requests, rows, matcher.vocab_size))

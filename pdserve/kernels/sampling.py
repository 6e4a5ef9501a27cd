"""The sampling operation on a batch of logits and its torch reference: per row a temperature, then
top-k, top-p and min-p truncation, then one draw. It knows nothing of requests (engine/sampler.py
turns those into these per-row lists).

RowFilters is the per-row truncation both implementations take; the one-launch Triton version is
kernels/sampling_triton.py (its cuts found by kernels/truncation_triton.py), and KernelSample is
its signature as the engine's Sampler holds it. The reference sorts each row for top-k/top-p and
draws with the Gumbel race argmax(p / E), E ~ Exp(1), so a row with its own generator draws
independently of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.host_tensors import list_on, to_device


@dataclass
class RowFilters:
    """Per row: top_k (0: off), top_p (1: off), min_p (0: off)."""

    top_k: list[int]
    top_p: list[float]
    min_p: list[float]

    def cuts_top_p(self) -> bool:
        return any(p < 1.0 for p in self.top_p)

    def cuts_top_k(self) -> bool:
        return any(k > 0 for k in self.top_k)

    def searches(self) -> bool:
        """Whether any row needs the kernel's search for a top-k/top-p cut (min-p alone does not)."""
        return self.cuts_top_k() or self.cuts_top_p()

    def off(self) -> bool:
        """Whether no row truncates at all."""
        return not self.searches() and not any(m > 0 for m in self.min_p)


class KernelSample(Protocol):
    """A one-launch sampler (sampling_triton.triton_sample): one int64 token id per row of logits."""

    def __call__(
        self,
        logits: torch.Tensor,
        temperatures: list[float],
        seed: int | None = None,
        filters: RowFilters | None = None,
        chunks: int | None = None,
    ) -> torch.Tensor: ...


def sample_reference(
    logits: torch.Tensor,
    temperatures: list[float],
    filters: RowFilters,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token id per row of float32 logits [rows, vocab] from softmax(logits / T) truncated
    by `filters` (every T > 0). A row with a generator draws its noise from it (on the CPU, then
    copied): its token does not depend on the other rows."""
    temps = list_on(temperatures, logits.device, torch.float32)
    logits = logits / temps[:, None]
    logits = top_k_top_p(logits, filters.top_k, filters.top_p)
    probs = logits.softmax(dim=-1)
    if any(m > 0 for m in filters.min_p):  # decided on the host: no device sync
        min_ps = list_on(filters.min_p, logits.device, torch.float32)
        keep = probs >= min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    # Gumbel-style race: argmax(p / E) with E ~ Exp(1) draws from p.
    noise = torch.rand_like(probs)
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i] = to_device(torch.rand(probs.shape[1], generator=generator), probs.device)
    exp = -torch.log(noise.clamp_min(1e-20))
    return (probs / exp).argmax(dim=-1)


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of the draw for output position `position` of a request seeded `seed`: a function of
    the two alone (splitmix64 of both), so a request continues its random stream identically on any
    instance, after any hand-off or resume, whatever the batch. In [0, 2**63) (a Generator's range)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """logits [rows, vocab] with the entries outside each row's top-k (0: off) and top-p (1: off) at
    -inf. Top-p keeps a token while the mass strictly above it is below p; ties at the cut are kept
    as the sort happened to order them."""
    vocab = logits.shape[1]
    ks = [k if k > 0 else vocab for k in top_k]
    if all(k >= vocab for k in ks) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= list_on(ks, logits.device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
    drop |= cum_before >= list_on(top_p, logits.device, torch.float32)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)

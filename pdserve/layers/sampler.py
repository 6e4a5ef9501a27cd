"""Turn the logits of the rows that sample into tokens, each row by its request's SamplingParams.

Order per row: penalties (repetition on prompt + output, presence/frequency on output) -> min_tokens
masks EOS and stop ids -> greedy argmax, or temperature, top-k, top-p, min-p, then a draw. A request
with a seed draws from its own generator, so its tokens do not depend on what else is in the batch.
Logprobs are those of the model's raw distribution. On CUDA, a batch without seeds or logprobs
goes through the Triton sampler instead (triton_sampler.py, triton_cut.py;
PDSERVE_TRUNCATING_KERNEL=0 sends top-k/top-p rows to the torch sort), after penalties and bans
(penalties.py) where rows have them. Nothing here waits for the GPU until a result is read
(PendingSample.wait).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.request import Logprob, Request
from pdserve.host_tensors import to_device, to_host_later
from pdserve.layers.penalties import apply_penalties

# Rows with top-k/top-p take triton_cut.py's search unless PDSERVE_TRUNCATING_KERNEL=0 (the torch
# sort): on an H200 it measured faster than the sort at 1-128 rows of a 152k vocabulary (128 rows,
# top-p: 1.9 vs 3.6 ms a call; docs/performance.md). min-p needs no search: always Triton.
TRUNCATING_KERNEL = os.environ.get("PDSERVE_TRUNCATING_KERNEL", "1") != "0"


@dataclass
class SampleResult:
    token_id: int
    logprob: Logprob | None


@dataclass
class PendingSample:
    """A step's sampling, queued: the ids on the model's device (row order; a next step can take them
    as input before the host sees them) and the call that waits for the results."""

    token_ids: torch.Tensor | None
    wait: Callable[[], list[SampleResult]]


def sample_later(
    logits: torch.Tensor, requests: list[Request], unseen: torch.Tensor | None = None
) -> PendingSample:
    """Queue the sampling of logits [num_rows, vocab] (one row per request). On CUDA nothing waits
    until `wait()`: the host can do other work while the GPU finishes the step. Batches without
    seeds or logprobs take the Triton sampler (triton_sampler.py, triton_cut.py; top-k/top-p unless
    TRUNCATING_KERNEL is off), penalties and min_tokens bans applied first to a float32 copy
    (penalties.py); the rest the torch path, queued the same way. unseen: each row's previous token
    where the host does not have it yet (a step launched ahead; penalties.apply_penalties)."""
    if logits.is_cuda and all(kernel_draws(r) for r in requests):
        from pdserve.layers.triton_sampler import HAS_TRITON, triton_sample

        filters = _filters(requests, logits.shape[1])
        if HAS_TRITON and (filters is None or not filters.searches() or TRUNCATING_KERNEL):
            if not all(plain_sampling(r) for r in requests):
                logits = logits.to(torch.float32, copy=True)  # the model's logits stay as they are
                apply_penalties(logits, requests, unseen)  # and min_tokens bans
            temperatures = [r.params.temperature for r in requests]
            drawn = triton_sample(logits, temperatures, filters=filters)
            return PendingSample(drawn, _results_later(drawn, None, requests))
    tokens, logprobs = _sample_torch(logits, requests, unseen)
    return PendingSample(tokens, _results_later(tokens, logprobs, requests))


@dataclass
class RowFilters:
    """Per row, for the one-launch sampler: top_k (0: off), top_p (1: off), min_p (0: off)."""

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


@dataclass
class _Logprobs:
    """On the device, for the rows that asked: the sampled token's log-probability and the top
    max(k) alternatives (each row keeps its own k)."""

    rows: list[int]
    chosen: torch.Tensor  # [n]
    top_ids: torch.Tensor  # [n, max k]
    top_values: torch.Tensor  # [n, max k]


def _results_later(
    tokens: torch.Tensor, logprobs: _Logprobs | None, requests: list[Request]
) -> Callable[[], list[SampleResult]]:
    """Queue the copies of the results to the host right behind the kernels that make them; the call
    waits for those copies only (a plain `.tolist()` later would also wait for every step queued
    since, such as a step launched ahead)."""
    parts = [tokens] + ([logprobs.chosen, logprobs.top_ids, logprobs.top_values] if logprobs else [])
    fetch = to_host_later(parts)

    def wait() -> list[SampleResult]:
        host = fetch()
        results = [SampleResult(t, None) for t in host[0].tolist()]
        if logprobs is not None:
            chosen, ids, values = host[1].tolist(), host[2].tolist(), host[3].tolist()
            for j, row in enumerate(logprobs.rows):
                k = requests[row].params.logprobs or 0
                top = list(zip(ids[j][:k], values[j][:k], strict=True))
                results[row].logprob = Logprob(results[row].token_id, chosen[j], top)
        return results

    return wait


def _sample_torch(
    logits: torch.Tensor, requests: list[Request], unseen: torch.Tensor | None = None
) -> tuple[torch.Tensor, _Logprobs | None]:
    """Every option, in torch, queued without a host wait: the drawn ids (on the logits' device) and
    the log-probabilities asked for."""
    logits = logits.float()
    raw = logits
    logits = logits.clone()
    dev = logits.device
    apply_penalties(logits, requests, unseen)  # and min_tokens bans
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        idx = _on(random_rows, dev)
        tokens[idx] = _sample_random(logits[idx], [requests[i] for i in random_rows])
    return tokens, _logprobs(raw, tokens, requests)


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> _Logprobs | None:
    """Log-probabilities of the model's raw distribution, for the rows that asked for them."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    idx = _on(rows, raw.device)
    logprobs = raw[idx].log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[idx][:, None])[:, 0]
    k = max(requests[i].params.logprobs or 0 for i in rows)
    values, ids = logprobs.topk(k, dim=-1)
    return _Logprobs(rows, chosen, ids, values)


def _on(
    values: list[int] | list[float], device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A small host list on `device` without waiting for the work queued there."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def kernel_draws(req: Request) -> bool:
    """Whether the Triton sampler can draw this row's token: anything but a seed (its own
    generator) or logprobs; penalties and min_tokens bans are applied to the logits before it."""
    return req.generator is None and req.params.logprobs is None


def plain_sampling(req: Request) -> bool:
    """What the Triton sampler draws from the model's logits as they are: greedy, or temperature with
    top-k, top-p and min-p. No penalties or min_tokens bans (applied to a float32 copy first), no
    seed (its own generator), no logprobs."""
    p = req.params
    return kernel_draws(req) and not p.has_penalties and req.num_output_tokens >= p.min_tokens


def _filters(requests: list[Request], vocab: int) -> RowFilters | None:
    """The rows' top-k, top-p and min-p for the kernel; None when every one is off."""
    ps = [r.params for r in requests]
    if all((p.top_k <= 0 or p.top_k >= vocab) and p.top_p >= 1.0 and p.min_p == 0.0 for p in ps):
        return None
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in ps]  # 0: off
    return RowFilters(top_k, [p.top_p for p in ps], [p.min_p for p in ps])


def _sample_random(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    temps = _on([r.params.temperature for r in requests], logits.device, torch.float32)
    logits = logits / temps[:, None]
    logits = _top_k_top_p(logits, requests)
    probs = logits.softmax(dim=-1)
    if any(r.params.min_p > 0 for r in requests):  # decided on the host: no device sync
        min_ps = _on([r.params.min_p for r in requests], logits.device, torch.float32)
        keep = probs >= min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    # Gumbel-style race: argmax(p / E) with E ~ Exp(1) draws from p.
    # One draw for the unseeded rows; a seeded row draws from its own (CPU) generator.
    noise = torch.rand_like(probs)
    for i, req in enumerate(requests):
        if req.generator is not None:
            noise[i] = to_device(torch.rand(probs.shape[1], generator=req.generator), probs.device)
    exp = -torch.log(noise.clamp_min(1e-20))
    return (probs / exp).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [r.params.top_k if r.params.top_k > 0 else vocab for r in requests]
    ps = [r.params.top_p for r in requests]
    if all(k >= vocab for k in ks) and all(p >= 1.0 for p in ps):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= _on(ks, logits.device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
    drop |= cum_before >= _on(ps, logits.device, torch.float32)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)

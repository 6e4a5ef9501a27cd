"""Turn the logits of the rows that sample into tokens, each row by its request's SamplingParams.

Order per row: penalties (repetition on prompt + output, presence/frequency on output) -> min_tokens
masks EOS and stop ids -> greedy argmax, or temperature, top-k, top-p, min-p, then a draw. A request
with a seed draws from its own generator, so its tokens do not depend on what else is in the batch.
Logprobs are those of the model's raw distribution. On CUDA, a batch whose rows are all greedy or
temperature-only goes through one Triton launch instead (triton_sampler.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.request import Logprob, Request


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


def sample_later(logits: torch.Tensor, requests: list[Request]) -> PendingSample:
    """Queue the sampling of logits [num_rows, vocab] (one row per request). On CUDA with the
    one-launch sampler nothing waits until `wait()`: the host can do other work while the GPU
    finishes the step."""
    if logits.is_cuda and all(plain_sampling(r, logits.shape[1]) for r in requests):
        from pdserve.layers.triton_sampler import HAS_TRITON, triton_sample

        if HAS_TRITON:
            drawn = triton_sample(logits, [r.params.temperature for r in requests])
            ids = _host_list_later(drawn)
            return PendingSample(drawn, lambda: [SampleResult(t, None) for t in ids()])
    tokens, results = _sample_torch(logits, requests)
    return PendingSample(tokens, lambda: results)


def _host_list_later(ids: torch.Tensor) -> Callable[[], list[int]]:
    """Queue the copy of device ids to the host right behind the kernel that makes them; the call
    waits for that copy only. (`ids.tolist()` later would also wait for every step queued since.)"""
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


def _sample_torch(logits: torch.Tensor, requests: list[Request]) -> tuple[torch.Tensor, list[SampleResult]]:
    """Every option, in torch: the drawn ids (on the logits' device) and the results."""
    logits = logits.float()
    raw = logits
    logits = logits.clone()
    for row, req in enumerate(requests):
        if req.params.has_penalties:
            _apply_penalties(logits[row], req)
        if req.num_output_tokens < req.params.min_tokens:
            banned = list(req.params.stop_token_ids) + (
                [] if req.params.ignore_eos else list(req.eos_token_ids)
            )
            if banned:
                logits[row, banned] = float("-inf")
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        tokens[idx] = _sample_random(logits[idx], [requests[i] for i in random_rows])
    token_list = tokens.tolist()
    return tokens, [
        SampleResult(
            tok, _logprob(raw[i], tok, req.params.logprobs) if req.params.logprobs is not None else None
        )
        for i, (tok, req) in enumerate(zip(token_list, requests, strict=True))
    ]


def plain_sampling(req: Request, vocab: int) -> bool:
    """Greedy or temperature alone: what the one-launch Triton sampler draws exactly."""
    p = req.params
    top_k_off = p.top_k <= 0 or p.top_k >= vocab
    banning = req.num_output_tokens < p.min_tokens
    return (
        top_k_off
        and p.top_p >= 1.0
        and p.min_p == 0.0
        and not p.has_penalties
        and not banning
        and req.generator is None
        and p.logprobs is None
    )


def _apply_penalties(row: torch.Tensor, req: Request) -> None:
    p = req.params
    device = row.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.token_ids)), device=device, dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    out = req.output_token_ids
    if out and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(out, device=device).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _sample_random(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    temps = torch.tensor([r.params.temperature for r in requests], device=logits.device)
    logits = logits / temps[:, None]
    logits = _top_k_top_p(logits, requests)
    probs = logits.softmax(dim=-1)
    if any(r.params.min_p > 0 for r in requests):  # decided on the host: no device sync
        min_ps = torch.tensor([r.params.min_p for r in requests], device=logits.device)
        keep = probs >= min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    # Gumbel-style race: argmax(p / E) with E ~ Exp(1) draws from p.
    # One draw for the unseeded rows; a seeded row draws from its own (CPU) generator.
    noise = torch.rand_like(probs)
    for i, req in enumerate(requests):
        if req.generator is not None:
            noise[i] = torch.rand(probs.shape[1], generator=req.generator).to(probs.device)
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
    drop = ranks >= torch.tensor(ks, device=logits.device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
    drop |= cum_before >= torch.tensor(ps, device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _logprob(raw_row: torch.Tensor, token: int, k: int) -> Logprob:
    logprobs = raw_row.log_softmax(dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return Logprob(token, float(logprobs[token]), top)

"""Turn the logits of the rows that sample into tokens, each row by its request's SamplingParams.

Order per row: penalties (repetition on prompt + output, presence/frequency on output) -> min_tokens
masks EOS and stop ids -> a structured request's grammar masks what it does not allow (built on the
host while the step's forward runs; structured/masks.py) -> greedy argmax, or temperature, top-k,
top-p, min-p, then a draw. A request with a seed draws from its own generator, reseeded for each
output position from (seed, position) (kernels/sampling.position_seed), so its tokens depend neither
on the batch nor on where each one was drawn (a prefill instance, a decode instance, a resume
elsewhere).
Logprobs are those of the model's raw distribution.

A Sampler is built once per model runner from its KernelConfig. With Triton chosen, a batch without
seeds or logprobs goes through the one-launch kernel (kernels/sampling_triton.py), after penalties
and bans (penalties.py) where rows have them; top-k/top-p rows too unless `truncating_sampler` is
off, which sends them to the torch sort (kernels/sampling.py, the reference every other batch
takes). Nothing here waits for the GPU until a result is read (PendingSample.wait).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.penalties import apply_penalties
from pdserve.engine.request import Logprob, Request
from pdserve.host_tensors import list_on, to_host_later
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.sampling import KernelSample, RowFilters, position_seed, sample_reference
from pdserve.structured.masks import apply_grammars


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

    def release(self) -> None:
        """Queue the sampling if it is held back (DeferredSample); queued already here."""


class DeferredSample(PendingSample):
    """The sampling of a step launched ahead (engine/ahead.py) whose rows include a grammar still
    constraining: its masks need the previous step's tokens accepted on the host, so the forward
    runs at once and the sampling is queued by `release()`, after the engine has appended those
    tokens. The host then fills the masks while the GPU still runs the forward, and the rows are
    sampled from exactly the state a step that was not launched ahead would see (no `unseen`)."""

    def __init__(self, sampler: Sampler, logits: torch.Tensor, requests: list[Request]) -> None:
        super().__init__(None, self._wait_released)
        self._queue = lambda: sampler.sample_later(logits, requests)
        self._queued: PendingSample | None = None

    def release(self) -> None:
        if self._queued is None:
            self._queued = self._queue()
            self.token_ids = self._queued.token_ids

    def _wait_released(self) -> list[SampleResult]:
        self.release()
        assert self._queued is not None
        return self._queued.wait()


@dataclass(frozen=True)
class Sampler:
    """The sampling of one model runner. kernel: the one-launch sampler (None: the torch path for
    every batch); truncating: whether top-k/top-p rows take it too (min-p needs no search: always)."""

    kernel: KernelSample | None = None
    truncating: bool = True

    @classmethod
    def for_device(cls, kernels: KernelConfig, device: torch.device) -> Sampler:
        """The choice `kernels` makes for a runner on `device`. triton is imported only when chosen,
        so a CPU process never imports it (tests set TRITON_INTERPRET first and choose it)."""
        resolved = kernels.resolved(device.type)
        if not resolved.triton:
            return cls(None, resolved.truncating_sampler)
        from pdserve.kernels.sampling_triton import triton_sample

        return cls(triton_sample, resolved.truncating_sampler)

    def sample_later(
        self, logits: torch.Tensor, requests: list[Request], unseen: torch.Tensor | None = None
    ) -> PendingSample:
        """Queue the sampling of logits [num_rows, vocab] (one row per request). On CUDA nothing waits
        until `wait()`: the host can do other work while the GPU finishes the step. unseen: each row's
        previous token where the host does not have it yet (a step launched ahead;
        penalties.apply_penalties)."""
        if self.kernel is not None and all(kernel_draws(r) for r in requests):
            filters = _filters(requests, logits.shape[1])
            if filters is None or not filters.searches() or self.truncating:
                if not all(plain_sampling(r) for r in requests):
                    logits = logits.to(torch.float32, copy=True)  # the model's logits stay as they are
                    apply_penalties(logits, requests, unseen)  # and min_tokens bans
                    apply_grammars(logits, requests)
                temperatures = [r.params.temperature for r in requests]
                drawn = self.kernel(logits, temperatures, filters=filters)
                return PendingSample(drawn, _results_later(drawn, None, requests))
        tokens, logprobs = sample_torch(logits, requests, unseen)
        return PendingSample(tokens, _results_later(tokens, logprobs, requests))


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


def sample_torch(
    logits: torch.Tensor, requests: list[Request], unseen: torch.Tensor | None = None
) -> tuple[torch.Tensor, _Logprobs | None]:
    """Every option, in torch, queued without a host wait: the drawn ids (on the logits' device) and
    the log-probabilities asked for."""
    logits = logits.float()
    raw = logits
    logits = logits.clone()
    dev = logits.device
    apply_penalties(logits, requests, unseen)  # and min_tokens bans
    apply_grammars(logits, requests)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        idx = list_on(random_rows, dev)
        drawing = [requests[i] for i in random_rows]
        temperatures = [r.params.temperature for r in drawing]
        generators = [_positioned(r) for r in drawing]
        filters = row_filters(drawing, logits.shape[1])
        tokens[idx] = sample_reference(logits[idx], temperatures, filters, generators)
    return tokens, _logprobs(raw, tokens, requests)


def _positioned(req: Request) -> torch.Generator | None:
    """A seeded request's generator, reseeded for the output position it draws now (R4: the draw
    is a function of seed and position only, so it continues identically on any instance)."""
    g, seed = req.generator, req.params.seed
    if g is not None and seed is not None:
        g.manual_seed(position_seed(seed, req.num_output_tokens))
    return g


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> _Logprobs | None:
    """Log-probabilities of the model's raw distribution, for the rows that asked for them."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    idx = list_on(rows, raw.device)
    logprobs = raw[idx].log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[idx][:, None])[:, 0]
    k = max(requests[i].params.logprobs or 0 for i in rows)
    values, ids = logprobs.topk(k, dim=-1)
    return _Logprobs(rows, chosen, ids, values)


def kernel_draws(req: Request) -> bool:
    """Whether the Triton sampler can draw this row's token: anything but a seed (its own
    generator) or logprobs; penalties and min_tokens bans are applied to the logits before it."""
    return req.generator is None and req.params.logprobs is None


def plain_sampling(req: Request) -> bool:
    """What the Triton sampler draws from the model's logits as they are: greedy, or temperature with
    top-k, top-p and min-p. No penalties, min_tokens bans or grammar (applied to a float32 copy
    first), no seed (its own generator), no logprobs."""
    p = req.params
    plain = kernel_draws(req) and not p.has_penalties and req.num_output_tokens >= p.min_tokens
    return plain and req.matcher is None


def row_filters(requests: list[Request], vocab: int) -> RowFilters:
    """The rows' top-k (0 where off or >= vocab), top-p and min-p."""
    ps = [r.params for r in requests]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in ps]
    return RowFilters(top_k, [p.top_p for p in ps], [p.min_p for p in ps])


def _filters(requests: list[Request], vocab: int) -> RowFilters | None:
    """The rows' filters for the kernel; None when every one is off."""
    filters = row_filters(requests, vocab)
    return None if filters.off() else filters

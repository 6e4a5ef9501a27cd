"""Launching a decode step before the previous step's tokens reach the host, so the GPU never waits.

In a steady decode batch, step N+1 is step N's requests again, one token each, at the next position.
Only its input ids are unknown on the host, and those are on the device already: N's sampled ids.
So the engine launches N+1 right behind N, taking N's ids tensor as N+1's input ids, and waits for N
only then; collecting N, building its outputs and scheduling overlap N+1 on the GPU.

Allowed only where nothing can change the batch or need the token on the host first: N was decodes
only, every one sampling; no request waits for admission and the running list is N's; every request
needs nothing of its token on the host (sampler.kernel_draws: no seed, no logprobs; penalties and
min_tokens bans count N's tokens on the device, engine/penalties.py); none can reach
its length limit with N's token, none hands KV to a decode instance, and the pool has the blocks for
everyone's next slot (no preemption). A grammar still constraining a row needs N's token on the host
for N+1's mask: then only N+1's forward is launched ahead, and its sampling is queued once N is
collected and its tokens accepted (sampler.DeferredSample), the mask filled while the forward runs.
A request that N ends (EOS, a stop id, a stop string) has one
wasted row in N+1, dropped when N+1 is collected (Engine._update skips finished requests).

Why this is not part of the scheduler's one rule: that rule reads the host's view of each request
(`num_tokens`), in which N's token does not exist yet, and walks the queues, the prefix cache and the
budget. Launching ahead needs the step in flight (the engine's, not the scheduler's) and must cost
nothing beyond one block check per request, or the GPU would wait on the host again; so it stays a
separate, small rule that only ever reuses the running batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.block_manager import cdiv
from pdserve.engine.request import Request
from pdserve.engine.sampler import PendingSample, kernel_draws
from pdserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from pdserve.engine.step_clock import Marks

if TYPE_CHECKING:
    from pdserve.disagg.connector import KVConnector


@dataclass
class InFlight:
    """A launched step: what ran, its queued sampling, and what was decided at launch."""

    sched: SchedulerOutput
    pending: PendingSample
    sampling: list[Request] = field(default_factory=list)  # the requests that sample, in row order
    prefill_tokens: int = 0  # prompt tokens it computes
    computed_applied: bool = False  # update_computed ran already (a step was launched ahead of it)
    marks: Marks | None = None  # StepClock's marks around its launch


def can_run_ahead(flight: InFlight, scheduler: Scheduler, connector: KVConnector | None) -> bool:
    chunks = flight.sched.chunks
    if flight.pending.token_ids is None or scheduler.waiting or len(flight.sampling) != len(chunks):
        return False
    if any(c.num_tokens != 1 for c in chunks):
        return False
    if [id(r) for r in scheduler.running] != [id(r) for r in flight.sampling]:
        return False
    bs = scheduler.bm.block_size
    need = 0
    for r in flight.sampling:
        if not kernel_draws(r) or r.num_output_tokens + 2 > r.max_output_tokens:
            return False
        if connector is not None and connector.sends_kv(r.handoff):
            return False
        need += cdiv(r.num_computed_tokens + 2, bs) > len(r.block_ids)  # N computes one, N+1 one more
    return need <= scheduler.bm.num_free_blocks


def schedule_ahead(flight: InFlight, scheduler: Scheduler) -> SchedulerOutput:
    """Step N+1 for N's requests (call after scheduler.update_computed(N))."""
    out = SchedulerOutput()
    for r in flight.sampling:
        ok = scheduler.bm.allocate(r, 1)
        assert ok, "can_run_ahead counted the blocks"
        out.chunks.append(ScheduledChunk(r, 1, ahead=True))
    return out

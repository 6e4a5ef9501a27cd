"""The scheduler: one rule, each request's computed tokens catch up with its known tokens.

Every step has a token budget. Running requests go first (a decode needs 1 token, an unfinished prompt
its next chunk); when the pool runs dry the most recent running request is preempted (blocks freed,
recomputed later). Then waiting requests are admitted in arrival order, reusing prefix-cache blocks,
while budget, sequence slots and blocks last. The scheduler never touches the model or tokens' text.

A request whose KV comes from a prefill instance (the connector says so) is admitted without spending
budget: the leading full blocks of its prompt this instance already caches are taken as prefix hits
(they count as computed), blocks for the rest are reserved; it waits in WAITING_FOR_KV until
`activate`, and the prefill instance sends KV only for the reserved blocks.
The waiting queue is then the decode side's bounded prealloc queue: nothing is ever over-committed.
`schedule` only decides: the requests it reserved blocks for are in `SchedulerOutput.reserved`, and
the engine asks their prefill instances for the KV (no network I/O here).

A local request whose tokens are those of a request still waiting for its KV (the other choices of an
n > 1 request whose first choice is the hand-off: server/generation.py) waits for that KV instead of
computing the prompt again: it is queued (at the front) once the KV has arrived, and takes the prompt's
full blocks from the prefix cache; it computes only the tokens after them and draws its own first token.

    leader  (FromPrefill)  WAITING ─ reserve ─▶ WAITING_FOR_KV ─ activate ─▶ RUNNING
    choices 1..n-1 (local) held in `sharing` ──────────────────▶ waiting (front) ─▶ prefix hits + tail
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.config import SchedulerConfig
from pdserve.disagg.handoff import HandOff
from pdserve.engine.block_manager import BlockManager, cdiv
from pdserve.engine.outputs import StageLog
from pdserve.engine.request import Request, RequestStatus
from pdserve.errors import InvalidRequestError, OverloadedError


class RemoteKV(Protocol):
    """The scheduler's two questions about disaggregation: disagg/connector.py's KVConnector answers
    them for the engine, planning/sim_instance.py's for the simulator on its simulated clock."""

    def gets_kv_remotely(self, handoff: HandOff | None) -> bool: ...

    def request_finished(self, request_id: str, handoff: HandOff | None) -> bool: ...


@dataclass
class ScheduledChunk:
    """One request's share of a step: tokens [start, start + num_tokens) run through the model."""

    request: Request
    num_tokens: int
    ahead: bool = False  # a decode of the token the step before is still sampling (engine/ahead.py)

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Does this chunk reach the end of the known tokens, so that the step samples a new one?"""
        return self.ahead or self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    reserved: list[Request] = field(default_factory=list)  # blocks reserved for remote KV: ask for it

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, connector: RemoteKV | None = None
    ) -> None:
        self.config = config
        self.bm = block_manager
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished, blocks kept until the connector lets go
        self.sharing: dict[str, list[Request]] = {}  # a remote-KV request's id -> local ones with its tokens
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_kv_reused_tokens = 0  # decode: prompt tokens whose KV was cached here, not received
        self.finished_times = StageLog()  # stage times of finished requests, for /metrics

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.waiting_for_kv)

    @property
    def num_seqs(self) -> int:
        return len(self.running) + len(self.waiting_for_kv)

    def add_request(self, request: Request) -> None:
        """Queue a request; raises if it can never fit or the waiting queue is full."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        pool_tokens = self.bm.num_blocks * self.bm.block_size
        if cdiv(request.num_tokens + 1, self.bm.block_size) > self.bm.num_blocks:
            raise InvalidRequestError(
                f"prompt of {request.num_tokens} tokens can never fit in the KV cache ({pool_tokens} tokens)",
                param="prompt",
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise OverloadedError(f"server is overloaded: {len(self.waiting)} requests already waiting")
        request.max_model_len = min(request.max_model_len, pool_tokens)
        self.requests[request.request_id] = request
        leader = self._kv_on_its_way(request)
        if leader is not None:
            self.sharing.setdefault(leader.request_id, []).append(request)
        else:
            self.waiting.append(request)

    def _kv_on_its_way(self, request: Request) -> Request | None:
        """A request still waiting for KV from a prefill instance whose tokens this local request has,
        if at least one full block of them could be shared through the prefix cache."""
        if self.connector is None or request.handoff is not None or not self.bm.enable_prefix_caching:
            return None
        if request.num_tokens <= self.bm.block_size:
            return None
        pending = [*self.waiting_for_kv.values(), *self.waiting]
        for other in pending:
            if self.connector.gets_kv_remotely(other.handoff) and other.token_ids == request.token_ids:
                return other
        return None

    def _release_sharing(self, leader: Request) -> None:
        """The leader's KV is in (or will never come): the requests that waited for it queue first."""
        self.waiting.extendleft(reversed(self.sharing.pop(leader.request_id, [])))

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted, error): leave the queues, free the blocks."""
        if request.is_finished:
            return
        request.status = status
        self.finished_times.add(request.times)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            self._stop_sharing(request)
        self.waiting_for_kv.pop(request.request_id, None)
        self._release_sharing(request)
        if self.connector is not None and self.connector.request_finished(
            request.request_id, request.handoff
        ):
            self.held[request.request_id] = request  # KV bytes are landing in its blocks right now
        else:
            self.bm.free(request)
        self.requests.pop(request.request_id, None)

    def _stop_sharing(self, request: Request) -> None:
        for leader_id, followers in list(self.sharing.items()):
            if request in followers:
                followers.remove(request)
                if not followers:
                    del self.sharing[leader_id]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.bm.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget
            out.chunks.append(ScheduledChunk(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and self.num_seqs < self.config.max_num_seqs:
            request = self.waiting[0]
            if self.connector is not None and self.connector.gets_kv_remotely(request.handoff):
                if not self._reserve_for_remote_kv(request):
                    return
                out.reserved.append(request)
                continue
            computed = self.bm.get_computed_blocks(request)
            num_cached = len(computed) * self.bm.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.bm.allocate(request, num_new, computed):
                return
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:  # a resumed request's outputs are no prompt tokens
                request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
                self.bm.query_tokens += request.num_tokens
                self.bm.hit_tokens += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_new))
            budget -= num_new

    def _reserve_for_remote_kv(self, request: Request) -> bool:
        """Take the cached prefix (at least one token is always left, so at least one block comes),
        reserve blocks for the rest. The hits are referenced from here: nothing evicts them."""
        computed = self.bm.get_computed_blocks(request)
        num_cached = len(computed) * self.bm.block_size
        if not self.bm.allocate(request, request.num_tokens - num_cached, computed):
            return False
        self.waiting.popleft()
        request.num_computed_tokens = num_cached
        self.num_kv_reused_tokens += num_cached
        request.status = RequestStatus.WAITING_FOR_KV
        self.waiting_for_kv[request.request_id] = request
        return True

    def release(self, request_id: str) -> None:
        """The connector is done writing into a finished request's blocks: free them."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.bm.free(request)

    def activate(self, request: Request) -> None:
        """The request's KV (prompt, and a resumed request's outputs) has fully arrived: it joins the
        running batch."""
        del self.waiting_for_kv[request.request_id]
        request.handoff = None  # from now on it is a local request (a preemption recomputes here)
        request.num_computed_tokens = request.num_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.bm.cache_full_blocks(request)
        self._release_sharing(request)

    def _preempt(self, request: Request) -> None:
        self.bm.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_computed(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens' KV is in the cache."""
        for chunk in out.chunks:
            if chunk.request.is_finished:  # ended while the step ran (stop string, abort): blocks freed
                continue
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.bm.cache_full_blocks(chunk.request)

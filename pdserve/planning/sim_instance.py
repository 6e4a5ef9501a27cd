"""One simulated instance: pdserve's own Scheduler and BlockManager, a step priced by the profile.

The engine loop, on a simulated clock (engine/engine.py's order, on a CPU that waits for each step):

    begin(now):  KV that arrived -> activate, first token out at `now` (no model step for it)
                 schedule() -> reserved requests (ask their prefill), chunks -> step of cost(chunks)
                 requests that arrived during a step launched ahead join the queue only now
    end():       update_computed; every sampling chunk appends a token (decode, colocated) or ends
                 the prefill for a peer (its blocks held until the hand-off lands, as a lease does)

Launching ahead (engine/ahead.py, GPU engines): a decode-only step with nothing waiting has the next
step launched right behind it, so the batch of step N+1 is decided when N starts. A request arriving
while such a step runs is admitted one step later than the scheduler's rule alone says: after N+1,
not after N (on average one and a half decode steps of waiting instead of half of one).

The simulated connector answers the scheduler's two questions the way disagg/connector.py does.
Nothing here knows the clock's meaning or the other instances: simulator.py drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.disagg.handoff import FromPrefill, HandOff, ToDecode
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.errors import PDServeError
from pdserve.planning.costs import is_decode, step_seconds
from pdserve.planning.profile import Profile
from pdserve.router.instances import Info, Instance, Load, Role

TOKEN = 1  # every generated token's id; requests ignore EOS, so only lengths end them


class SimConnector:
    """The scheduler's view of disaggregation, as the KVConnector answers it."""

    @staticmethod
    def gets_kv_remotely(handoff: HandOff | None) -> bool:
        return isinstance(handoff, FromPrefill)

    @staticmethod
    def request_finished(request_id: str, handoff: HandOff | None) -> bool:
        return isinstance(handoff, ToDecode)  # the prefill's blocks are read until the hand-off lands


@dataclass
class StepDone:
    tokens: list[Request] = field(default_factory=list)  # a token appended (finished ones included)
    sent: list[Request] = field(default_factory=list)  # prefills for peers whose prompt is computed


class SimInstance:
    def __init__(
        self,
        name: str,
        role: Role,
        profile: Profile,
        config: SchedulerConfig,
        prefix_caching: bool = True,
        launch_ahead: bool = False,
    ) -> None:
        self.name, self.role, self.profile = name, role, profile
        self.bm = BlockManager(profile.num_blocks, profile.block_size, prefix_caching)
        self.scheduler = Scheduler(config, self.bm, SimConnector() if role != "both" else None)
        self.arrived: list[Request] = []  # KV and first token landed, to activate at the next begin
        self.step: SchedulerOutput | None = None
        self.view = Instance(url=f"sim://{name}", role=role, healthy=True)
        self.busy_seconds = 0.0
        self.launch_ahead = launch_ahead
        self.next_decided = False  # the running step had the next one launched behind it
        self.deferred: list[Request] = []  # arrived after that: they wait for the step after next
        self.refused: list[tuple[Request, PDServeError]] = []  # deferred ones the scheduler refused

    @property
    def busy(self) -> bool:
        return self.step is not None

    def add(self, request: Request) -> None:
        if self.next_decided:
            self.deferred.append(request)
        else:
            self.scheduler.add_request(request)

    def _admit_deferred(self) -> None:
        for request in self.deferred:
            try:
                self.scheduler.add_request(request)
            except PDServeError as e:
                self.refused.append((request, e))
        self.deferred = []

    def _decides_next(self, out: SchedulerOutput) -> bool:
        """engine/ahead.can_run_ahead's test, on what the simulator knows: decodes only, every one
        sampling, nothing waiting, none at its length limit with this step's token."""
        if not self.launch_ahead or self.scheduler.waiting:
            return False
        return all(
            is_decode(c) and c.samples and c.request.num_output_tokens + 2 <= c.request.max_output_tokens
            for c in out.chunks
        )

    def begin(self) -> tuple[list[Request], list[Request], float | None]:
        """(requests activated now, requests to ask a prefill for, the step's seconds or None: idle)."""
        activated = []
        for request in self.arrived:
            self.scheduler.activate(request)
            request.append_token(TOKEN)
            status = request.check_stop_token()
            if status is not None:
                self.scheduler.finish_request(request, status)
            activated.append(request)
        self.arrived = []
        out = self.scheduler.schedule()
        self.next_decided = False
        if self.deferred:
            self._admit_deferred()
            if out.is_empty:  # nothing was decided ahead after all: they need not wait
                out = self.scheduler.schedule()
        if out.is_empty:
            return activated, out.reserved, None
        self.step = out
        self.next_decided = self._decides_next(out)
        seconds = step_seconds(self.profile, out.chunks)
        self.busy_seconds += seconds
        return activated, out.reserved, seconds

    def end(self) -> StepDone:
        out, self.step = self.step, None
        assert out is not None
        sampling = [c.request for c in out.chunks if c.samples]
        self.scheduler.update_computed(out)
        done = StepDone()
        for request in sampling:
            if request.is_finished:
                continue
            if isinstance(request.handoff, ToDecode):
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
                done.sent.append(request)
                continue
            request.append_token(TOKEN)
            status = request.check_stop_token()
            if status is not None:
                self.scheduler.finish_request(request, status)
            done.tokens.append(request)
        return done

    def refresh_view(self) -> Instance:
        """The router's view of this instance: a fresh load report (the router polls; here it is exact)."""
        s, bm = self.scheduler, self.bm
        queued = list(s.waiting) + s.running
        load = Load(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            num_waiting_for_kv=len(s.waiting_for_kv),
            tokens_in_flight=sum(r.num_tokens - r.num_computed_tokens for r in queued),
        )
        self.view.mark_up(Info(self.role, self.profile.model, self.view.url, load), (0, 0))
        return self.view

"""The discrete-event simulation of a layout: requests arrive, the router's policy places them, each
instance runs its real scheduler on a simulated clock, prefills hand KV to decodes.

    arrival ──policy──▶ colocated instance ─ steps ─▶ tokens
            ──policy──▶ decode: reserve blocks ─(Reserve)─▶ prefill: steps ─▶ prompt done
                        decode ◀─(KV + first token, transfer_seconds(bytes))─┘ blocks held till then
                        decode: activate (first token out), decode steps ─▶ tokens

A request reaches its instance's engine after the profile's front (tokenization, HTTP, the hand-off
to the engine: profile.Front; its busy figure where that engine is stepping), so TTFT and latency
include it and TPOT does not. Where a token's text may be
empty (`visible_fraction` < 1: a dummy-weight model sampling ids its tokenizer has no text for), the
client's first token is the first one with text, as `pdserve bench serve` counts it (SimOptions).

Events are (time, order): step ends, KV landing, arrivals. Every instance is one engine loop: when
its step ends it starts the next at once, and an idle one starts when something reaches it. Routing
sees exact load reports (a real router's are up to one poll old). What comes out is each client
request's token times, which report.py turns into `pdserve bench serve`'s JSON.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.config import SchedulerConfig
from pdserve.disagg.handoff import FromPrefill, ToDecode
from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import PDServeError
from pdserve.planning.costs import handoff_bytes
from pdserve.planning.layout import Layout
from pdserve.planning.profile import Profile
from pdserve.planning.sim_instance import SimInstance
from pdserve.planning.workload import RequestSpec
from pdserve.router.instances import Role
from pdserve.router.policies import Policy, make_policy


@dataclass
class Trace:
    """One client request as the client would see it."""

    spec: RequestSpec
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    error: str = ""
    first_visible: int = 0  # the index of the first token whose text the client sees


@dataclass(frozen=True)
class SimOptions:
    policy: str = "round_robin"
    transport: str | None = None  # the profile's transport curve (None: its fastest)
    max_num_seqs: int | None = None  # None: the profile's
    max_num_batched_tokens: int | None = None
    prefix_caching: bool = True
    control_seconds: float = 0.0  # a Reserve's trip to the prefill instance
    seed: int = 0
    launch_ahead: bool | None = None  # engine/ahead.py (None: as the profile's engine, off on a CPU)
    # the chance that a token has text: 1 for real weights; a dummy-weight run's is in its profile's
    # front (profile.Front.visible_fraction), for comparing with runs measured with those weights
    visible_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.visible_fraction <= 1:
            raise ValueError("visible_fraction must be in (0, 1]")


@dataclass
class SimRun:
    traces: list[Trace]
    instances: list[SimInstance]
    end: float


class Simulator:
    def __init__(
        self, layout: Layout, profiles: dict[int, Profile], options: SimOptions = SimOptions()
    ) -> None:
        missing = layout.tps - set(profiles)
        if missing:
            raise ValueError(f"layout {layout} needs a profile at TP {sorted(missing)}")
        self.layout, self.options = layout, options
        import random

        self.policy: Policy = make_policy(options.policy, rng=random.Random(options.seed))
        self.visible_rng = random.Random(options.seed + 1)
        self.both = self._instances("both", layout.colocated, profiles[layout.tp])
        self.prefills = self._instances("prefill", layout.prefill, profiles[layout.tp_prefill])
        self.decodes = self._instances("decode", layout.decode, profiles[layout.tp_decode])
        self.events: list[tuple[float, int, Callable[[float], None]]] = []
        self.order = itertools.count()
        self.traces: dict[str, Trace] = {}
        self.prefill_of: dict[str, SimInstance] = {}  # decode request id -> its prefill instance
        self.decode_of: dict[str, SimInstance] = {}
        self.params: dict[int, SamplingParams] = {}

    def _instances(self, role: Role, count: int, profile: Profile) -> list[SimInstance]:
        o = self.options
        config = SchedulerConfig(
            max_num_seqs=o.max_num_seqs or profile.max_num_seqs,
            max_num_batched_tokens=o.max_num_batched_tokens or profile.max_num_batched_tokens,
            max_waiting=1 << 30,  # the simulated client waits; the queue is what it measures
        )
        ahead = o.launch_ahead if o.launch_ahead is not None else profile.meta.get("device", "cpu") != "cpu"
        return [
            SimInstance(f"{role}-{i}", role, profile, config, o.prefix_caching, ahead) for i in range(count)
        ]

    @property
    def instances(self) -> list[SimInstance]:
        return self.both + self.prefills + self.decodes

    def run(self, specs: Sequence[RequestSpec]) -> SimRun:
        for i, spec in enumerate(specs):
            self._at(spec.arrival, functools.partial(self._arrive, index=i, spec=spec))
        end = 0.0
        while self.events:
            end, _, action = heapq.heappop(self.events)
            action(end)
        return SimRun(list(self.traces.values()), self.instances, end)

    def _at(self, when: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (when, next(self.order), action))

    def _choose(self, pool: list[SimInstance], role: Role, body: dict[str, Any]) -> SimInstance:
        views = {i.refresh_view().url: i for i in pool}
        return views[self.policy.choose([i.view for i in pool], role, body).url]

    def _arrive(self, now: float, *, index: int, spec: RequestSpec) -> None:
        """The router picks the instances at once; the request reaches its engine after the front
        (the instance's HTTP, tokenization, hand-off), slower where that engine is stepping."""
        rid = f"r{index}"
        self.traces[rid] = Trace(spec, first_visible=self._first_visible())
        prompt = list(range(index << 20, (index << 20) + spec.input_len))  # unique: no accidental prefix hits
        body = {"prompt": prompt}
        params = self._params(spec.output_len)
        if self.layout.disaggregated:
            target = self._choose(self.decodes, "decode", body)
            prefill = self._choose(self.prefills, "prefill", body)
            self.prefill_of[rid] = prefill
            request = Request(rid, prompt, params, handoff=FromPrefill(prefill.name))
        else:
            target = self._choose(self.both, "both", body)
            request = Request(rid, prompt, params)
        front = target.profile.front.seconds(spec.input_len, busy=target.busy)
        self._at(now + front, functools.partial(self._deliver, target=target, request=request))

    def _deliver(self, now: float, *, target: SimInstance, request: Request) -> None:
        try:
            target.add(request)
        except PDServeError as e:
            self.traces[request.request_id].error = str(e)
            return
        self.decode_of[request.request_id] = target
        self._kick(target, now)

    def _first_visible(self) -> int:
        """How many tokens come before the first with text (geometric in visible_fraction)."""
        p, n = self.options.visible_fraction, 0
        while p < 1 and self.visible_rng.random() >= p:
            n += 1
        return n

    def _params(self, max_tokens: int) -> SamplingParams:
        """Shared by every request of that length: validating one per request would dominate the run."""
        params = self.params.get(max_tokens)
        if params is None:
            params = self.params[max_tokens] = SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True
            )
        return params

    def _kick(self, instance: SimInstance, now: float) -> None:
        if not instance.busy:
            self._begin(instance, now)

    def _begin(self, instance: SimInstance, now: float) -> None:
        activated, reserved, seconds = instance.begin()
        for request, error in instance.refused:  # a prefill's own "kv-" copy answers for its client's
            self.traces[request.request_id.removeprefix("kv-")].error = str(error)
        instance.refused = []
        for request in activated:
            self._token(request, now)
        for request in reserved:
            self._at(now + self.options.control_seconds, functools.partial(self._reserve, request))
        if seconds is not None:
            self._at(now + seconds, lambda t: self._end(instance, t))

    def _end(self, instance: SimInstance, now: float) -> None:
        done = instance.end()
        for request in done.tokens:
            self._token(request, now)
        for request in done.sent:
            self._send(instance, request, now)
        self._begin(instance, now)

    def _token(self, request: Request, now: float) -> None:
        trace = self.traces[request.request_id]
        trace.token_times.append(now)
        if request.is_finished:
            trace.finished = now

    def _reserve(self, request: Request, now: float) -> None:
        """The decode reserved blocks: its prefill instance computes the prompt for them."""
        prefill = self.prefill_of[request.request_id]
        cached = request.num_computed_tokens // prefill.profile.block_size
        target = ToDecode(
            request.request_id,
            self.decode_of[request.request_id].name,
            tuple(request.block_ids[cached:]),
            cached,
        )
        params = self._params(1)
        prefill.add(Request(f"kv-{request.request_id}", request.token_ids, params, handoff=target))
        self._kick(prefill, now)

    def _send(self, prefill: SimInstance, request: Request, now: float) -> None:
        assert isinstance(request.handoff, ToDecode)
        target = request.handoff
        num_bytes = handoff_bytes(prefill.profile, len(target.block_ids))
        seconds = prefill.profile.transfer_seconds(num_bytes, self.options.transport)
        self._at(now + seconds, lambda t: self._landed(prefill, request.request_id, target.transfer_id, t))

    def _landed(self, prefill: SimInstance, prefill_id: str, rid: str, now: float) -> None:
        prefill.scheduler.release(prefill_id)
        decode = self.decode_of[rid]
        decode.arrived.append(decode.scheduler.waiting_for_kv[rid])
        self._kick(decode, now)
        self._kick(prefill, now)  # blocks came back: a prompt waiting for them may start

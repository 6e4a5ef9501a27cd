"""A prefill instance as the entry (BladeLLM's way: `--decode URL...`): a client request that comes
without kv_transfer_params goes to a decode instance with a hand-off naming this instance, and the
decode instance's answer (a stream or one body) is relayed to the client unchanged.

    client ──▶ PREFILL (this) ── body + signed kv_transfer_params{this kv_addr, this URL} ──▶ DECODE
                 ▲                       ◀── Reserve, KV written into its blocks, Done ──────────┘ │
                 └───────────────── SSE or JSON, relayed as it comes ◀─────────────────────────────┘

It is the router's path with this instance as the only prefill instance, so it is the router's code:
router/proxy.py's Proxy (routes, opens, retries a decode that refuses the connection or fails the
request) and relay.py's Relay (resumes a stream whose decode instance fails, up to --max-resumes,
or stalls past --stall-timeout), over this instance's peers (server/peers.py). The fields are signed
with the cluster secret this instance holds, as the router signs them.

Which decode instance: the least loaded (router/policies.py) of those with at most
`--decode-max-queued` requests waiting (their /pd/info report, plus what this instance sent them that
is still open and not yet in a report). None under the bound: 503 at once, in OpenAI's shape
(code "overloaded"), as an instance with a full queue answers; holding the request here instead would
only hide the queue from the client's retry or load balancer. A body this instance would refuse anyway
(not a JSON object, or carrying kv_transfer_params) is answered locally, as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pdserve.cluster_secret import ClusterSecret
from pdserve.config import ServerConfig
from pdserve.router.app import until_disconnect
from pdserve.router.errors import RouterError
from pdserve.router.instances import Info, Instance, Registry, Role
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import LeastLoaded, Policy
from pdserve.router.proxy import Call, Proxy
from pdserve.server.peers import Peers


class BoundedDecode(Policy):
    """Decode: least loaded among those with at most `max_queued` waiting, else 503. Prefill: this
    instance, the only prefill candidate there is."""

    name = "entry"

    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        self.least = LeastLoaded(max_queued)

    def choose(
        self, candidates: Sequence[Instance], role: Role, body: Mapping[str, Any] | None = None
    ) -> Instance:
        if role != "decode":
            return self.least.choose(candidates, role)
        under = [i for i in candidates if waiting(i) <= self.max_queued]
        if not under:
            message = f"every decode instance has more than {self.max_queued} requests waiting"
            raise RouterError(503, message, "overloaded", "service_unavailable_error")
        return self.least.choose(under, role)


def waiting(instance: Instance) -> int:
    """Requests a decode instance holds but does not run yet: its latest report, plus ours sent since
    that report was asked for (those of them still open: one that ended waits nowhere)."""
    load = instance.load
    reported = 0 if load is None else load.num_waiting + load.num_waiting_for_kv
    return reported + min(instance.pending_requests, instance.inflight)


class _ThisInstance(Instance):
    """This prefill instance, as the proxy's prefill candidate: always in the rotation (were its engine
    dead, the server would be exiting), never polled."""

    def mark_down(self, reason: str) -> None:
        pass


class PrefillRelay:
    """Hands client requests to decode peers naming this instance, and relays their answers."""

    def __init__(
        self, url: str, kv_addr: str, decodes: Peers, secret: ClusterSecret | None, config: ServerConfig
    ) -> None:
        me = _ThisInstance(url, "prefill")
        me.mark_up(Info(role="prefill", kv_addr=kv_addr), (0, 0))
        self.me, self.decodes = me, decodes
        # its relays as a router counts them (per decode peer, errors, TTFT, latency), in this
        # instance's /metrics (entry.py); its KV bytes are in this instance's own counters already
        self.metrics = RouterMetrics()
        self.metrics.registry.unregister(self.metrics.kv)
        policy = BoundedDecode(config.decode_max_queued)
        self.proxy = Proxy(
            Registry([me]),
            policy,
            self.metrics,
            decodes.poller,
            decodes.client,
            secret,
            config.max_resumes,
            config.stall_timeout,
        )

    async def relayed(self, raw: Request, path: str, api_key: str | None) -> Response | None:
        """The decode instance's answer to this request; None: not one to relay (answer it locally)."""
        content = await raw.body()
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):
            return None
        if not isinstance(body, dict) or "kv_transfer_params" in body:
            return None
        # with a key of its own this instance sends that (its client's header); else the client's
        authorization = None if api_key else raw.headers.get("authorization")
        call = Call(path, content, body, authorization)
        self.proxy.registry.instances = [self.me, *self.decodes.registry.instances]  # as they are now
        if body.get("stream") is True:
            return await until_disconnect(raw, self.proxy.stream(call))
        return await until_disconnect(raw, self.proxy.unary(call))

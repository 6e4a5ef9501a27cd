"""The router signs the hand-off fields it sends a decode instance (issue 29, item 2): what it sends
passes cluster_secret.check_handoff under the cluster's secret and fails under any other, a changed
field breaks the signature, a colocated request goes out byte for byte, and a disaggregated router
without a secret says so at startup.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from pdserve.cluster_secret import ClusterSecret, HandoffRefused, check_handoff
from pdserve.router.instances import HealthPoller, Instance, Registry
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import RoundRobin
from pdserve.router.proxy import Call, Proxy, Route
from pdserve.router.upstream import Upstream

SECRET = ClusterSecret.from_text("a cluster secret of enough bytes")
BODY = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def _route(prefill: bool = True) -> Route:
    decode = Instance("http://127.0.0.1:9001", "decode")
    source = Instance("http://127.0.0.1:9002", "prefill", kv_addr="tcp://127.0.0.1:9003")
    return Route(decode, source if prefill else None, tokens=4)


def test_hand_off_fields_are_signed_with_the_cluster_secret() -> None:
    raw = json.dumps(BODY).encode()
    call = Call("/v1/chat/completions", raw, BODY)
    sent = json.loads(_route().content(call, SECRET))
    params = sent.pop("kv_transfer_params")
    assert sent == BODY
    assert params["prefill_kv_addr"] == "tcp://127.0.0.1:9003"
    assert params["prefill_url"] == "http://127.0.0.1:9002"
    check_handoff(SECRET, params)  # the decode instance's check passes
    with pytest.raises(HandoffRefused):
        check_handoff(ClusterSecret.from_text("another cluster's secret!!"), params)
    with pytest.raises(HandoffRefused):
        check_handoff(SECRET, {**params, "prefill_kv_addr": "tcp://10.0.0.66:9003"})
    unsigned = json.loads(_route().content(call, None))["kv_transfer_params"]
    with pytest.raises(HandoffRefused):
        check_handoff(SECRET, unsigned)
    assert _route(prefill=False).content(call, SECRET) == raw  # colocated: the client's bytes


def _proxy(registry: Registry, secret: ClusterSecret | None) -> None:
    async def build() -> None:
        async with Upstream(10.0) as client:
            poller = HealthPoller(registry, client, 1.0, 1.0)
            Proxy(registry, RoundRobin(), RouterMetrics(), poller, client, secret)

    asyncio.run(build())


def test_a_disaggregated_router_without_a_secret_warns(caplog: pytest.LogCaptureFixture) -> None:
    disagg = Registry.build(["http://127.0.0.1:9002"], ["http://127.0.0.1:9001"], [])
    with caplog.at_level(logging.WARNING, logger="pdserve.router.proxy"):
        _proxy(disagg, SECRET)
        _proxy(Registry.build([], [], ["http://127.0.0.1:9001"]), None)  # colocated: nothing to sign
        assert not caplog.records
        _proxy(disagg, None)
    assert len(caplog.records) == 1 and "--cluster-secret-file" in caplog.records[0].getMessage()

"""Routing policies, instance load bookkeeping and the router's SSE helpers; no network, no model."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pdserve.router.app import RouterConfig
from pdserve.router.instances import Info, Instance, Load, Registry, role_problem
from pdserve.router.metrics import KVTotals
from pdserve.router.policies import LeastLoaded, RoundRobin, least_band, make_policy
from pdserve.router.sse import carries_token, error_code, event_data


def decode(
    url: str, running: int = 0, free: int = 100, waiting: int = 0, waiting_for_kv: int = 0
) -> Instance:
    load = Load(
        num_running=running,
        num_waiting=waiting,
        num_free_blocks=free,
        num_blocks=100,
        num_waiting_for_kv=waiting_for_kv,
    )
    return Instance(url, "decode", healthy=True, load=load)


def prefill(url: str, tokens: int | None, waiting: int = 0) -> Instance:
    load = Load(num_waiting=waiting, tokens_in_flight=tokens)
    return Instance(url, "prefill", healthy=True, kv_addr="tcp://127.0.0.1:1", load=load)


def picks(
    policy: LeastLoaded, candidates: list[Instance], role: str = "decode", n: int = 200
) -> Counter[str]:
    return Counter(policy.choose(candidates, role).url for _ in range(n))  # type: ignore[arg-type]


# ---- round robin ----


def test_round_robin_cycles_each_role_independently() -> None:
    policy = RoundRobin()
    a, b, c = (decode(u) for u in ("http://a", "http://b", "http://c"))
    p1, p2 = prefill("http://p1", 0), prefill("http://p2", 0)
    chosen = []
    for _ in range(6):
        chosen.append(policy.choose([c, a, b], "decode").url)
        policy.choose([p1, p2], "prefill")
    assert chosen == ["http://a", "http://b", "http://c"] * 2


def test_round_robin_skips_what_is_not_offered() -> None:
    policy = RoundRobin()
    a, b = decode("http://a"), decode("http://b")
    assert {policy.choose([a], "decode").url for _ in range(3)} == {"http://a"}
    assert {policy.choose([a, b], "decode").url for _ in range(4)} == {"http://a", "http://b"}


# ---- least loaded ----


def test_least_loaded_decode_takes_the_fewest_running() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    candidates = [decode("http://a", running=5), decode("http://b", running=2), decode("http://c", running=9)]
    assert picks(policy, candidates) == {"http://b": 200}


def test_least_loaded_counts_waiting_for_kv_as_load() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    candidates = [decode("http://a", running=2, waiting_for_kv=4), decode("http://b", running=4)]
    assert picks(policy, candidates) == {"http://b": 200}


def test_least_loaded_ties_go_to_most_free_blocks() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    candidates = [decode("http://a", running=3, free=10), decode("http://b", running=3, free=80)]
    assert picks(policy, candidates) == {"http://b": 200}


def test_least_loaded_spreads_at_random_within_the_band() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    candidates = [decode(f"http://{u}") for u in "abc"] + [decode("http://busy", running=1)]
    counts = picks(policy, candidates, n=600)
    assert set(counts) == {"http://a", "http://b", "http://c"}
    assert min(counts.values()) > 120  # roughly uniform


def test_band_is_ten_percent_of_the_minimum() -> None:
    a, b, c = (
        decode("http://a", running=100),
        decode("http://b", running=110),
        decode("http://c", running=111),
    )
    assert [i.url for i in least_band([a, b, c], lambda i: i.running)] == ["http://a", "http://b"]
    zero, one = decode("http://z"), decode("http://o", running=1)
    assert [i.url for i in least_band([zero, one], lambda i: i.running)] == ["http://z"]


def test_least_loaded_skips_decode_over_max_queued_unless_all_are() -> None:
    policy = LeastLoaded(decode_max_queued=4, rng=random.Random(0))
    idle_but_queued = decode("http://q", running=0, waiting_for_kv=5)
    busy = decode("http://b", running=8)
    assert picks(policy, [idle_but_queued, busy]) == {"http://b": 200}
    also_queued = decode("http://q2", running=0, waiting=3, waiting_for_kv=3)
    assert set(picks(policy, [idle_but_queued, also_queued])) == {"http://q"}  # all over: least loaded


def test_least_loaded_prefill_uses_tokens_in_flight() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    candidates = [prefill("http://p1", tokens=4000), prefill("http://p2", tokens=300, waiting=3)]
    assert picks(policy, candidates, role="prefill") == {"http://p2": 200}


def test_prefill_without_token_counts_falls_back_to_requests() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    candidates = [prefill("http://p1", tokens=None, waiting=4), prefill("http://p2", tokens=None, waiting=1)]
    assert picks(policy, candidates, role="prefill") == {"http://p2": 200}


def test_requests_routed_since_the_report_count_until_the_next_one() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    a, b = decode("http://a"), decode("http://b")
    for _ in range(4):  # a burst between two polls alternates instead of piling onto one
        chosen = policy.choose([a, b], "decode")
        chosen.begin(tokens=10)
    assert (a.routed, b.routed) == (2, 2)
    a.mark_up(Info(role="decode", load=Load(num_running=2, num_free_blocks=90)), (2, 20))
    assert a.pending_requests == 0 and a.running == 2


def test_instance_without_load_reports_uses_router_inflight() -> None:
    policy = LeastLoaded(rng=random.Random(0))
    a, b = Instance("http://a", "both", healthy=True), Instance("http://b", "both", healthy=True)
    a.begin(tokens=5)
    assert picks(policy, [a, b], role="both") == {"http://b": 200}
    a.end(tokens=5)
    assert a.running == 0 and a.inflight_tokens == 0


def test_make_policy() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_loaded", 3), LeastLoaded)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


# ---- registry, roles, config ----


def test_registry_normalizes_and_rejects_duplicates() -> None:
    registry = Registry.build(["127.0.0.1:1/"], ["http://127.0.0.1:2"], [])
    assert [i.url for i in registry.instances] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert registry.needed_roles == ("prefill", "decode") and not registry.colocated
    with pytest.raises(ValueError, match="once"):
        Registry.build(["http://h:1"], ["h:1"], [])


def test_registry_why_none_names_the_role_and_reasons() -> None:
    registry = Registry.build(["http://p:1"], ["http://d:1"], [])
    registry.instances[0].mark_down("connection refused")
    assert registry.healthy("prefill") == []
    assert registry.why_none("prefill") == "no healthy prefill instance (http://p:1: connection refused)"


@pytest.mark.parametrize(
    ("expected", "info", "problem"),
    [
        ("both", Info(role="both"), None),
        ("both", Info(role="prefill", kv_addr="tcp://x:1"), "colocated"),
        ("prefill", Info(role="prefill", kv_addr="tcp://x:1"), None),
        ("prefill", Info(role="prefill"), "kv_addr"),
        ("prefill", Info(role="decode", kv_addr="tcp://x:1"), "expected 'prefill'"),
        ("decode", Info(role="decode"), None),
        ("decode", Info(role="both"), "--role decode"),
    ],
)
def test_role_problem(expected: str, info: Info, problem: str | None) -> None:
    found = role_problem(expected, info)  # type: ignore[arg-type]
    assert found is None if problem is None else problem in (found or "")


def test_info_from_json() -> None:
    info = Info.from_json(
        {"role": "decode", "model": "m", "kv_addr": "tcp://h:5", "load": {"num_running": 3}}
    )
    assert (info.role, info.kv_addr, info.load) == ("decode", "tcp://h:5", Load(num_running=3))
    with pytest.raises(ValueError):
        Info.from_json({"role": "router"})


def test_router_config_needs_one_mode() -> None:
    RouterConfig(instances=("http://a",))
    RouterConfig(prefill=("http://p",), decode=("http://d",))
    for bad in ({}, {"prefill": ("http://p",)}, {"instances": ("http://a",), "decode": ("http://d",)}):
        with pytest.raises(ValueError):
            RouterConfig(**bad)  # type: ignore[arg-type]


# ---- SSE helpers, KV totals ----


def test_event_helpers() -> None:
    preamble = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
    token = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
    text = b'data: {"choices": [{"index": 0, "text": "Hi", "finish_reason": null}]}\n\n'
    failed = b'data: {"error": {"message": "m", "type": "server_error", "code": "prefill_failed"}}\n\n'
    assert not carries_token(event_data(preamble))
    assert carries_token(event_data(token)) and carries_token(event_data(text))
    assert not carries_token(event_data(b": keep-alive\n\n"))
    assert event_data(b"data: [DONE]\n\n") == "[DONE]"
    assert error_code(event_data(failed)) == "prefill_failed"
    assert error_code(event_data(token)) is None


def test_kv_totals_parse_sums_labels() -> None:
    text = (
        "# TYPE pdserve_kv_transfer_bytes counter\n"
        'pdserve_kv_transfer_bytes_total{transport="tcp"} 100.0\n'
        'pdserve_kv_transfer_bytes_total{transport="ipc"} 50.0\n'
        "# TYPE pdserve_kv_transfer_seconds histogram\n"
        'pdserve_kv_transfer_seconds_bucket{le="0.1"} 2.0\n'
        'pdserve_kv_transfer_seconds_bucket{le="+Inf"} 3.0\n'
        "pdserve_kv_transfer_seconds_sum 0.5\n"
        "pdserve_kv_transfer_seconds_count 3.0\n"
    )
    totals = KVTotals.parse(text)
    assert totals is not None
    assert (totals.bytes, totals.seconds_sum, totals.seconds_count) == (150.0, 0.5, 3.0)
    assert totals.buckets == {0.1: 2.0, float("inf"): 3.0}
    assert KVTotals.parse("# nothing\nother_metric 1.0\n") is None

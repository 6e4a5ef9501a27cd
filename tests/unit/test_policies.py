"""Routing policies, instance load bookkeeping and the router's SSE helpers; no network, no model."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import pytest

from pdserve.router.app import RouterConfig
from pdserve.router.instances import HealthPoller, Info, Instance, Load, Registry, role_problem
from pdserve.router.metrics import KVTotals, RouterMetrics
from pdserve.router.policies import (
    CacheAware,
    LeastLoaded,
    PowerOfTwo,
    RoundRobin,
    least_band,
    make_policy,
)
from pdserve.router.prefix_index import CHUNK_CHARS, PrefixIndex, prompt_chain
from pdserve.router.proxy import Call, Proxy
from pdserve.router.sse import carries_token, error_code, event_data
from pdserve.router.upstream import Upstream


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
    assert isinstance(make_policy("power_of_two"), PowerOfTwo)
    aware = make_policy("cache_aware", imbalance=3.0)
    assert isinstance(aware, CacheAware) and aware.imbalance == 3.0
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


# ---- power of two ----


def test_power_of_two_takes_the_less_loaded_of_two_drawn() -> None:
    policy = PowerOfTwo(rng=random.Random(0))
    loads = {"http://a": 0, "http://b": 3, "http://c": 6, "http://d": 9}
    candidates = [decode(u, running=r) for u, r in loads.items()]
    counts = picks(policy, candidates, n=600)  # type: ignore[arg-type]
    assert "http://d" not in counts  # the most loaded never wins a pair
    assert counts["http://a"] > counts["http://b"] > counts["http://c"] > 0  # 1/2, 1/3, 1/6 of pairs
    assert picks(policy, [decode("http://only", running=50)]) == {"http://only": 200}  # type: ignore[arg-type]


def test_power_of_two_prefill_weighs_tokens_and_decode_skips_over_queued() -> None:
    policy = PowerOfTwo(decode_max_queued=2, rng=random.Random(0))
    p = [prefill("http://p1", tokens=5000), prefill("http://p2", tokens=10)]
    assert picks(policy, p, role="prefill") == {"http://p2": 200}  # type: ignore[arg-type]
    d = [decode("http://q", running=0, waiting=5), decode("http://b", running=7)]
    assert picks(policy, d) == {"http://b": 200}  # type: ignore[arg-type]


# ---- cache aware ----

SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 20}


def chat(*turns: str) -> dict[str, object]:
    """A conversation: the shared system prompt, then user/assistant turns alternating."""
    roles = ("user", "assistant")
    messages = [SYSTEM] + [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]
    return {"model": "m", "messages": messages, "stream": True}


def test_prompt_chain_is_chained_per_message_and_per_chunk() -> None:
    one, two = prompt_chain(chat("hi")), prompt_chain(chat("hi", "hello", "more"))
    assert len(one.hashes) == 2 and two.hashes[:2] == one.hashes and len(two.hashes) == 4
    assert prompt_chain(chat("ho")).hashes[0] == one.hashes[0] != prompt_chain(chat("ho")).hashes[1]
    assert prompt_chain({**chat("hi"), "model": "other"}).hashes[0] != one.hashes[0]
    text = prompt_chain({"prompt": "x" * (2 * CHUNK_CHARS + 1)})
    assert text.weights == (CHUNK_CHARS, CHUNK_CHARS, 1)
    assert len(prompt_chain({"prompt": list(range(130))}).hashes) == 3
    for unreadable in ({}, {"prompt": 5}, {"messages": "not a list"}):
        assert prompt_chain(unreadable).hashes == ()


def test_cache_aware_sends_the_next_turn_to_the_same_instances() -> None:
    policy = CacheAware(rng=random.Random(0))
    p = [prefill(f"http://p{k}", tokens=0) for k in range(4)]
    d = [decode(f"http://d{k}") for k in range(4)]
    first = {}
    for conv in range(8):  # first turns share only the system prompt: they spread as load grows
        body = chat(f"question {conv}")
        chosen = policy.choose(p, "prefill", body), policy.choose(d, "decode", body)
        for instance in chosen:
            instance.begin(tokens=sum(prompt_chain(body).weights) // 4 + 1)  # in flight, as proxy.py does
        first[conv] = (chosen[0].url, chosen[1].url)
    assert len({pf for pf, _ in first.values()}) >= 3 and len({dc for _, dc in first.values()}) >= 3
    for instance in p + d:  # the first turns are answered; the next load report says all are idle
        idle = Load(num_free_blocks=100, num_blocks=100, tokens_in_flight=0)
        pending = (instance.pending_requests, instance.pending_tokens)
        instance.mark_up(Info(role=instance.role, load=idle), pending)
    for conv in range(8):
        body = chat(f"question {conv}", f"answer {conv}", "and then?")
        for _ in range(5):
            chosen = policy.choose(p, "prefill", body), policy.choose(d, "decode", body)
            assert (chosen[0].url, chosen[1].url) == first[conv]


def test_cache_aware_falls_back_to_least_load_beyond_the_imbalance() -> None:
    policy = CacheAware(rng=random.Random(0), imbalance=2.0)
    body = chat("q")
    tokens = sum(prompt_chain(body).weights) // 4 + 1
    cached, idle = prefill("http://cached", tokens=0), prefill("http://idle", tokens=0)
    assert policy.choose([cached], "prefill", body) is cached
    cached.load = Load(tokens_in_flight=2 * tokens)  # within 2 x (0 + one request): still affine
    assert policy.choose([cached, idle], "prefill", body) is cached
    cached.load = Load(tokens_in_flight=2 * tokens + 1)  # beyond: least load, which now owns it
    assert policy.choose([cached, idle], "prefill", body) is idle
    cached.load = Load(tokens_in_flight=0)
    assert policy.choose([cached, idle], "prefill", body) is idle  # most recently served wins
    counted, spare = prefill("http://counted", tokens=None), prefill("http://spare", tokens=None, waiting=1)
    policy.choose([counted], "prefill", body)
    counted.load = Load(num_waiting=4)  # no token reports: load and threshold count requests
    assert policy.choose([counted, spare], "prefill", body) is counted  # 4 <= 2 x (1 + 1)
    counted.load = Load(num_waiting=5)
    assert policy.choose([counted, spare], "prefill", body) is spare
    busy, free = decode("http://busy", running=4), decode("http://free", running=1)
    policy.choose([busy], "decode", body)
    assert policy.choose([busy, free], "decode", body) is busy  # 4 <= 2 x (1 + 1)
    busy.load = Load(num_running=5, num_free_blocks=100, num_blocks=100)
    assert policy.choose([busy, free], "decode", body) is free


def test_cache_aware_prefers_the_longest_prefix_and_ignores_absent_instances() -> None:
    policy = CacheAware(rng=random.Random(0))
    a, b = prefill("http://a", tokens=0), prefill("http://b", tokens=0)
    policy.choose([a], "prefill", chat("long", "talk", "here"))
    policy.choose([b], "prefill", chat("other"))  # b owns the system prompt now, a the longer prefix
    assert policy.choose([a, b], "prefill", chat("long", "talk", "here", "next", "q")) is a
    assert policy.choose([b], "prefill", chat("long", "talk", "here", "x", "y")) is b  # a not offered


def test_the_proxy_routes_each_conversation_by_its_prompt() -> None:
    """Through Proxy.route, as a request goes: the body reaches the policy, next turns stick."""
    registry = Registry.build(["http://p1", "http://p2"], ["http://d1", "http://d2"], [])
    for instance in registry.instances:
        instance.healthy, instance.kv_addr = True, "tcp://127.0.0.1:1"

    def call(*turns: str) -> Call:
        body = chat(*turns)
        return Call("/v1/chat/completions", json.dumps(body).encode(), body)

    async def scenario() -> None:
        async with Upstream(10.0) as client:
            poller = HealthPoller(registry, client, 1.0, 1.0)
            proxy = Proxy(registry, CacheAware(rng=random.Random(0)), RouterMetrics(), poller, client)
            first = []
            for conv in range(6):  # all in flight at once (Proxy.open begins each route it takes)
                first.append(proxy.route(call(f"q{conv}")))
                first[-1].begin()
            assert {route.prefill.url for route in first if route.prefill} == {"http://p1", "http://p2"}
            for route in first:
                route.release()
            for conv, route in enumerate(first):
                for _ in range(3):
                    again = proxy.route(call(f"q{conv}", f"a{conv}", "more"))
                    assert again.prefill is route.prefill and again.target is route.target

    asyncio.run(scenario())


def test_prefix_index_evicts_least_recently_used_and_forgets_instances() -> None:
    index = PrefixIndex(capacity=4)
    old, new = prompt_chain(chat("old")), prompt_chain(chat("new", "x", "y"))  # 2 + 4 hashes
    index.record(old, "http://a")
    index.record(new, "http://b")
    assert len(index) == 4 and index.matches(old, ["http://a"]) == {"http://a": 0}
    assert index.matches(new, ["http://b"])["http://b"] == sum(new.weights)
    index.forget("http://b")
    assert len(index) == 0 and index.matches(new, ["http://b"]) == {"http://b": 0}
    with pytest.raises(ValueError):
        PrefixIndex(capacity=0)


def test_cache_aware_forgets_an_instance_that_left() -> None:
    policy = CacheAware(rng=random.Random(0))
    a, b = prefill("http://a", tokens=0), prefill("http://b", tokens=0)
    body = chat("q")
    policy.choose([a], "prefill", body)
    policy.choose([a], "decode", body)
    policy.forget("http://a")
    assert all(len(index) == 0 for index in policy.indexes.values())
    assert policy.choose([b], "prefill", body) is b


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

"""Nothing lost (issue 25): a stream whose instance fails is resumed on another one, and the client
sees one whole answer.

Router logic, against synthetic instances (tests/e2e/fake_instance.py, which speak the resume
contract and fail on request): every way a stream can fail (breaks off, stalls, ends early, an
error event), the budget, non-streamed retries, a draining instance.

Then the real thing: 1 prefill + 2 decode instances (the default model) behind a router; the decode
instance serving streams is SIGKILLed after their first chunks, greedy and seeded.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import fake_instance as fake
from tests.e2e.cluster import (
    MODEL,
    Instance,
    Proc,
    Router,
    check_lossless,
    concurrent_streams,
    free_port,
    metric,
    parse_stream,
    wait_until,
)

STALL_S = 1.0


class FakeCluster:
    """Two synthetic colocated instances behind one real `pdserve router` (--max-resumes 2)."""

    def __init__(self, log_dir: Path) -> None:
        self.ports = {name: free_port() for name in ("a", "b")}
        self.fakes = [
            Proc([sys.executable, "-m", "tests.e2e.fake_instance", str(port), name], log_dir / f"{name}.log")
            for name, port in self.ports.items()
        ]
        self.port = free_port()
        cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(self.port)]
        cmd += ["--health-interval", "0.3", "--stall-timeout", str(STALL_S), "--instance"]
        cmd += [f"http://127.0.0.1:{p}" for p in self.ports.values()]
        self.router = Proc(cmd, log_dir / "router.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for proc in (*self.fakes, self.router):
            proc.start()
        self.wait_all_healthy()

    def wait_all_healthy(self) -> None:
        def healthy() -> bool:
            answer = httpx.get(f"{self.url}/router/instances", timeout=2).json()
            return all(i["healthy"] for i in answer["instances"])

        assert wait_until(healthy, 60), f"router or fakes not healthy:\n{self.router.log()}"

    def metric(self, name: str, **labels: str) -> float:
        return metric(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def stop(self) -> None:
        for proc in (self.router, *self.fakes):
            proc.stop()


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    cluster = FakeCluster(tmp_path_factory.mktemp("resume-fake"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def stream(url: str, how: str, chat: bool = True) -> dict[str, Any]:
    """One streamed request through the router, read raw."""
    body: dict[str, Any] = {"model": "fake", "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": how}]
    else:
        body["prompt"] = how
    raw = b""
    with httpx.stream("POST", f"{url}/v1/{'chat/' if chat else ''}completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for piece in r.iter_bytes():
            raw += piece
    return parse_stream(raw, chat)


FAILURES = ["die@3", "stall@4", "end@5", "error:engine_dead@2", "error:instance_failed@7"]


@pytest.mark.parametrize("how", FAILURES)
def test_a_failed_stream_is_resumed_whole(fakes: FakeCluster, how: str) -> None:
    """The client sees the answer once: full text, one role chunk, one completion id, usage, one [DONE]."""
    fakes.wait_all_healthy()
    before = fakes.metric("pdserve_router_resumes_total", outcome="resumed")
    out = stream(fakes.url, how)
    assert out["errors"] == [] and out["done"] == 1, out
    assert out["text"] == fake.FULL_TEXT, out
    assert out["usage"]["completion_tokens"] == fake.N_TOKENS, out
    assert out["roles"] == 1 and len(out["ids"]) == 1, out
    assert fakes.metric("pdserve_router_resumes_total", outcome="resumed") == before + 1


def test_completions_stream_resumed(fakes: FakeCluster) -> None:
    fakes.wait_all_healthy()
    out = stream(fakes.url, "die@6", chat=False)
    assert out["errors"] == [] and out["done"] == 1 and out["text"] == fake.FULL_TEXT, out


def test_budget_spent_ends_with_the_error(fakes: FakeCluster) -> None:
    """Every attempt fails: after the two instances (the budget allows more, but both are excluded)
    the client gets the error event and one [DONE], and never repeated text."""
    fakes.wait_all_healthy()
    failed = fakes.metric("pdserve_router_resumes_total", outcome="failed")
    out = stream(fakes.url, "always-die@3")
    assert out["errors"] == ["instance_failed"] and out["done"] == 1, out
    assert out["text"] == fake.text_upto(6), out  # 3 tokens from each instance, none twice
    assert fakes.metric("pdserve_router_resumes_total", outcome="failed") == failed + 1


def test_failure_before_the_first_token_is_retried_whole(fakes: FakeCluster) -> None:
    """Instance a breaks off before any token: the request goes again, whole, to b (the role chunk
    of the first attempt, held back, never reaches the client)."""
    retried = fakes.metric("pdserve_router_retries_total", reason="instance_failed")
    for _ in range(2):  # round robin: one of them meets instance a
        fakes.wait_all_healthy()
        out = stream(fakes.url, "die-a@0")
        assert out["errors"] == [] and out["done"] == 1 and out["text"] == fake.FULL_TEXT, out
        assert out["roles"] == 1, out
    assert fakes.metric("pdserve_router_retries_total", reason="instance_failed") >= retried + 1


def test_unary_retried_and_draining_skipped(fakes: FakeCluster) -> None:
    """Non-streamed: an engine_dead answer is retried whole on the other instance; a draining instance
    is skipped without spending the budget (so with --max-resumes 2, four requests all succeed)."""
    retried = fakes.metric("pdserve_router_retries_total", reason="engine_dead")
    for _ in range(2):  # round robin: one of them meets instance a
        fakes.wait_all_healthy()
        body = {"model": "fake", "messages": [{"role": "user", "content": "die-a@1"}]}
        answer = httpx.post(f"{fakes.url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == fake.FULL_TEXT
    assert fakes.metric("pdserve_router_retries_total", reason="engine_dead") >= retried + 1
    drained = fakes.metric("pdserve_router_retries_total", reason="instance_draining")
    for _ in range(2):  # round robin: one of them meets instance a
        fakes.wait_all_healthy()
        body = {"model": "fake", "messages": [{"role": "user", "content": "drain-a"}]}
        answer = httpx.post(f"{fakes.url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
    assert fakes.metric("pdserve_router_retries_total", reason="instance_draining") >= drained + 1


# ---- a real cluster: 1 prefill + 2 decode + router, the default model ------------------------------------


class Disagg:
    """Two prefill and two decode instances behind a router, started once for the module. The first
    prefill instance is also an entry (--decode: clients may come to it without the router), and so
    is the second decode instance (--prefill: it picks a prefill instance itself)."""

    def __init__(self, log_dir: Path, model_dir: str) -> None:
        self.prefills = [Instance(f"prefill{i}", "prefill", model_dir, log_dir) for i in range(2)]
        self.decodes = [Instance(f"decode{i}", "decode", model_dir, log_dir) for i in range(2)]
        self.prefill = self.prefills[0]
        self.prefill.extra += ["--decode", *(d.url for d in self.decodes)]
        self.decodes[1].extra += ["--prefill", *(p.url for p in self.prefills)]
        urls = [p.url for p in self.prefills], [d.url for d in self.decodes]
        self.router = Router(log_dir / "router.log", *urls, 0.3)

    @property
    def instances(self) -> list[Instance]:
        return [*self.prefills, *self.decodes]

    def start(self) -> None:
        for instance in self.instances:
            instance.start()
        self.router.start()
        for instance in self.instances:
            instance.wait_ready()
        self.wait_all_healthy()

    def wait_all_healthy(self) -> None:
        """Every instance in the rotation: one a test killed is started again first."""
        for instance in self.instances:
            if instance.proc is not None and not instance.proc.alive:
                instance.restart()
        ok = wait_until(lambda: all(i["healthy"] for i in self.router.instances().values()), 60)
        assert ok, f"not every instance is back in the rotation: {self.router.instances()}"

    def stop(self) -> None:
        self.router.stop()
        for instance in self.instances:
            instance.stop()


@pytest.fixture(scope="module")
def disagg(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> Iterator[Disagg]:
    cluster = Disagg(tmp_path_factory.mktemp("resume-disagg"), model_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def killer(instance: Instance) -> Any:
    def kill() -> None:
        assert instance.proc is not None
        instance.proc.kill()

    return kill


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_decode_killed_mid_stream_loses_nothing(disagg: Disagg, seeded: bool) -> None:
    """12 streams; the decode instance serving half of them is SIGKILLed after their first chunks:
    every stream ends as the fault-free run does, with one [DONE], no error and the whole usage."""
    disagg.wait_all_healthy()
    reference = asyncio.run(concurrent_streams(disagg.router.url, seeded))
    victim = disagg.decodes[1 if seeded else 0]
    resumed = disagg.router.metric("pdserve_router_resumes_total", outcome="resumed")
    answers = asyncio.run(concurrent_streams(disagg.router.url, seeded, during=killer(victim)))
    check_lossless(reference, answers)
    assert disagg.router.metric("pdserve_router_resumes_total", outcome="resumed") >= resumed + 1
    for instance in disagg.instances:
        if instance is not victim:
            assert instance.wait_pool_free()["pool_free"]


def test_prefill_entry_resumes_when_its_decode_peer_dies(disagg: Disagg) -> None:
    """No router: the prefill instance is the entry and relays to a decode peer, which dies mid-stream;
    the entry resumes the streams on the other decode peer."""
    disagg.wait_all_healthy()
    ok = wait_until(lambda: all(p["healthy"] for p in disagg.prefill.get("/pd/peers").json()["peers"]), 30)
    assert ok, disagg.prefill.get("/pd/peers").text
    reference = asyncio.run(concurrent_streams(disagg.prefill.url, False, n=4))
    answers = asyncio.run(
        concurrent_streams(disagg.prefill.url, False, during=killer(disagg.decodes[0]), n=4)
    )
    check_lossless(reference, answers)
    log = disagg.prefill.proc.log(20000) if disagg.prefill.proc else ""
    assert "resumed on" in log, log


def _busy_prefills(disagg: Disagg, entry: str) -> list[Instance]:
    """The prefill instances the entry (router or decode entry) has a request open on."""
    if entry == "router":
        seen = list(disagg.router.instances().values())
    else:
        seen = disagg.decodes[1].get("/pd/peers").json()["peers"]
    busy = {i["url"] for i in seen if i["role"] == "prefill" and i["inflight"] > 0}
    return [p for p in disagg.prefills if p.url in busy]


@pytest.mark.parametrize("entry", ["router", "decode"])
def test_prefill_killed_mid_prefill_is_retried(disagg: Disagg, entry: str) -> None:
    """A prefill instance SIGKILLed while it computes a long prompt: the decode side answers
    prefill_failed (its reserved blocks freed), and the router (or the decode entry) retries the
    request on the other prefill instance; the client gets the fault-free answer."""
    disagg.wait_all_healthy()
    url = disagg.router.url if entry == "router" else disagg.decodes[1].url
    # ~800 tokens, new to every prefix cache: long enough to catch the prefill at work
    words = " ".join(f"{entry}{i}" for i in range(200))
    body = {"model": MODEL, "prompt": f"{words}. Summary:", "max_tokens": 4, "temperature": 0.0}
    victim: list[Instance] = []

    def kill_the_busy_prefill() -> None:
        def busy() -> bool:
            victim.extend(_busy_prefills(disagg, entry))
            return bool(victim)

        if wait_until(busy, 60, 0.02):
            killer(victim[0])()

    thread = threading.Thread(target=kill_the_busy_prefill)
    thread.start()
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    thread.join()
    assert victim, "no prefill instance was seen busy"
    assert answer.status_code == 200, answer.text
    reference = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()  # fault-free
    assert answer.json()["choices"][0]["text"] == reference["choices"][0]["text"]
    usage, want = answer.json()["usage"], reference["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (want["prompt_tokens"], 4)
    for decode in disagg.decodes:
        assert decode.wait_pool_free()["pool_free"]

"""The router over HTTP, with real processes: `pdserve router` in front of real `pdserve serve` instances.

Colocated mode (`--instance`) is tested against two real instances: answers equal the instance's own,
load spreads, auth and malformed JSON are answered by the router, instance errors pass through, a
killed instance leaves the rotation and returns when restarted, a stream whose instance dies ends with
an error event, a client that leaves aborts the instance's request, no instance -> 503. `pdserve up`
is run end to end as a subprocess. The router's side of the disaggregated path (kv_transfer_params,
prefill retry) is tested against small fake prefill/decode instances served from this process, which can
fail on cue; tests/e2e/test_disagg.py runs the path with real ones.

Every process is started in its own process group and killed with it, even when a test fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.models.prepare import resolve_model
from pdserve.router.metrics import metric_sum
from tests.e2e.cluster import NUM_BLOCKS, READY_TIMEOUT_S, ROOT, Proc, free_port, wait_until

CHAT = [{"role": "user", "content": "Name a color."}]


# ---- processes -------------------------------------------------------------------------------------------


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=2).status_code == 200


@dataclass
class Instances:
    """Real `pdserve serve` instances on fixed ports (a restart reuses the port)."""

    model: str
    log_dir: Path
    ports: list[int]
    procs: list[Proc] = field(default_factory=list)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--port",
            str(self.ports[i]),
            "--model",
            self.model,
        ]
        cmd += ["--num-blocks", NUM_BLOCKS, "--device", "cpu"]
        proc = Proc(cmd, self.log_dir / f"instance-{i}.log").start()
        if i < len(self.procs):
            self.procs[i] = proc
        else:
            self.procs.append(proc)

    def wait_ready(self, i: int) -> None:
        proc = self.procs[i]
        ok = wait_until(lambda: proc.alive and healthy(self.url(i)), READY_TIMEOUT_S, 0.5)
        assert ok, f"instance {i} not healthy:\n{proc.log()}"

    def kill(self, i: int) -> None:
        self.procs[i].kill()

    def restart(self, i: int) -> None:
        self.procs[i].kill()
        self.start(i)
        self.wait_ready(i)

    def revive(self) -> None:
        """Restart the instances a test killed: only when a later test needs them, so a kill in the
        module's last test costs no start."""
        dead = [i for i, proc in enumerate(self.procs) if not proc.alive]
        for i in dead:
            self.start(i)
        for i in dead:
            self.wait_ready(i)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture(scope="module")
def model() -> str:
    return resolve_model(None)


@pytest.fixture(scope="module")
def instance_group(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instances]:
    group = Instances(model, tmp_path_factory.mktemp("instances"), [free_port(), free_port()])
    try:
        for i in range(2):
            group.start(i)
        for i in range(2):
            group.wait_ready(i)
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def instances(instance_group: Instances) -> Instances:
    """The module's two instances, both running: one an earlier test killed is started again."""
    instance_group.revive()
    return instance_group


@dataclass
class Router:
    proc: Proc
    url: str
    api_key: str | None = None

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=120
        )

    def instances(self) -> dict[str, dict[str, Any]]:
        answer = httpx.get(f"{self.url}/router/instances", timeout=5).json()
        return {i["url"]: i for i in answer["instances"]}

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """start_router(*args, api_key=None, wait_healthy=True) -> a running `pdserve router`."""
    procs: list[Proc] = []

    def start(*args: str, api_key: str | None = None, wait_healthy: bool = True) -> Router:
        port = free_port()
        cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port)]
        cmd += ["--health-interval", "0.5", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        proc = Proc(cmd, tmp_path / f"router-{len(procs)}.log").start()
        procs.append(proc)
        router = Router(proc, f"http://127.0.0.1:{port}", api_key)
        check = (lambda: healthy(router.url)) if wait_healthy else (lambda: bool(router.instances()))
        assert wait_until(check, 60), f"router not ready:\n{proc.log()}"
        return router

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()


def colocated(instances: Instances, *indices: int) -> list[str]:
    return ["--instance", *(instances.url(i) for i in indices or (0, 1))]


def sse_events(response: httpx.Response) -> Iterator[Any]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


# ---- colocated, through real instances --------------------------------------------------------------------


def test_greedy_text_through_router_equals_direct(
    instances: Instances, start_router: Callable[..., Router]
) -> None:
    router = start_router(*colocated(instances))
    direct = openai.OpenAI(base_url=f"{instances.url(0)}/v1", api_key="none", max_retries=0, timeout=120)
    via = router.client()
    name = via.models.list().data[0].id
    kw: dict[str, Any] = {"model": name, "max_tokens": 6, "temperature": 0}

    want_chat = direct.chat.completions.create(messages=CHAT, **kw).choices[0].message.content
    want_text = direct.completions.create(prompt="The capital of France is", **kw).choices[0].text
    assert want_chat and want_text

    assert via.chat.completions.create(messages=CHAT, **kw).choices[0].message.content == want_chat
    assert via.completions.create(prompt="The capital of France is", **kw).choices[0].text == want_text

    usage = {"include_usage": True}
    chunks = list(via.chat.completions.create(messages=CHAT, stream=True, stream_options=usage, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    pieces = via.completions.create(prompt="The capital of France is", stream=True, **kw)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == want_text


def test_load_spreads_over_instances(instances: Instances, start_router: Callable[..., Router]) -> None:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1}
    rr = start_router(*colocated(instances))
    for _ in range(4):
        assert httpx.post(f"{rr.url}/v1/completions", json=body, timeout=120).status_code == 200
    for i in range(2):
        assert rr.metric("pdserve_router_requests_routed_total", instance=instances.url(i)) == 2

    ll = start_router(*colocated(instances), "--policy", "least_loaded")
    with ThreadPoolExecutor(4) as pool:  # concurrent: the router's own in-flight counts spread them
        codes = list(
            pool.map(lambda _: httpx.post(f"{ll.url}/v1/completions", json=body, timeout=120), range(4))
        )
    assert [c.status_code for c in codes] == [200] * 4
    counts = [ll.metric("pdserve_router_requests_routed_total", instance=instances.url(i)) for i in range(2)]
    assert counts == [2, 2]


def test_workload_records_generated_lengths(
    instances: Instances, start_router: Callable[..., Router]
) -> None:
    """/pd/workload records how many tokens each answer generated (whole: the body's usage; streamed:
    the usage chunk, else the stream's token ids), not the max_tokens of 50 it asked for."""
    router = start_router(*colocated(instances))
    via = router.client()
    kw: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "max_tokens": 50, "temperature": 0, "stop": ["."]}
    whole = via.chat.completions.create(messages=CHAT, **kw).usage
    usage = {"include_usage": True}
    chunks = list(
        via.completions.create(prompt="The capital of France is", stream=True, stream_options=usage, **kw)
    )
    streamed = chunks[-1].usage
    assert whole is not None and streamed is not None
    list(via.completions.create(prompt="The capital of France is", stream=True, **kw))  # no usage chunk

    seen = httpx.get(f"{router.url}/pd/workload", timeout=10).json()
    lengths = [s[2] for s in seen["samples"]]
    assert lengths == [whole.completion_tokens, streamed.completion_tokens, streamed.completion_tokens]
    assert 0 < max(lengths) < 50 and sum(seen["output_len"]["counts"]) == 3


def test_api_key(instances: Instances, start_router: Callable[..., Router]) -> None:
    router = start_router(*colocated(instances), api_key="secret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        answer = httpx.post(f"{router.url}/v1/completions", json={}, headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{router.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{router.url}/health", timeout=10).status_code == 200  # ops endpoints stay open
    name = router.client().models.list().data[0].id
    assert (
        router.client().completions.create(model=name, prompt="Hi", max_tokens=1).choices[0].text is not None
    )


def test_bad_json_is_the_routers_and_instance_errors_pass_through(
    instances: Instances, start_router: Callable[..., Router]
) -> None:
    router = start_router(*colocated(instances))
    for content in (b"{not json", b"[1, 2]", b"", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        answer = httpx.post(f"{router.url}/v1/chat/completions", content=content, timeout=10)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert router.metric("pdserve_router_requests_routed_total") == 0  # never forwarded
    for body in (
        {"model": "no-such-model", "prompt": "Hi"},
        {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "temperature": -1},
        {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": "8", "stream": True},
    ):
        via = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30)
        direct = httpx.post(f"{instances.url(0)}/v1/completions", json=body, timeout=30)
        assert 400 <= via.status_code < 500 and via.status_code == direct.status_code
        assert via.json() == direct.json()
    assert httpx.get(f"{router.url}/nowhere", timeout=10).json()["error"]["code"] == "not_found"


def test_client_disconnect_aborts_the_instance_request(
    instances: Instances, start_router: Callable[..., Router]
) -> None:
    router = start_router(*colocated(instances, 0))
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once", "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", f"{router.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        next(e for e in sse_events(r) if isinstance(e, dict) and e.get("choices"))
    # 400 tokens take a minute here; an aborted request frees its blocks within seconds
    pool_free = lambda: httpx.get(f"{instances.url(0)}/debug/kv", timeout=5).json()["pool_free"]  # noqa: E731
    assert wait_until(pool_free, 15)
    # not streamed: the client gives up after 3 s; meanwhile the instance is seen holding blocks
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(httpx.post, f"{router.url}/v1/completions", json=body, timeout=3)
        assert wait_until(lambda: not pool_free(), 3)
        with pytest.raises(httpx.ReadTimeout):
            call.result()
    assert wait_until(pool_free, 15)


def test_no_healthy_instance_is_503(start_router: Callable[..., Router]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    router = start_router("--instance", dead, wait_healthy=False)
    answer = httpx.get(f"{router.url}/health", timeout=10)
    assert answer.status_code == 503 and "colocated" in answer.json()["error"]["message"]
    answer = httpx.post(f"{router.url}/v1/completions", json={"model": "m", "prompt": "Hi"}, timeout=10)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_instance"
    assert dead in answer.json()["error"]["message"]

    disagg = start_router(
        "--prefill", dead, "--decode", f"http://127.0.0.1:{free_port()}", wait_healthy=False
    )
    message = httpx.get(f"{disagg.url}/health", timeout=10).json()["error"]["message"]
    assert "no healthy prefill instance" in message and "no healthy decode instance" in message


def test_killed_instance_leaves_rotation_and_returns(
    instances: Instances, start_router: Callable[..., Router]
) -> None:
    router = start_router(*colocated(instances))
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1}
    instances.kill(1)
    try:
        # before any health check notices: a refused connection is retried on the other instance
        for _ in range(3):
            assert httpx.post(f"{router.url}/v1/completions", json=body, timeout=60).status_code == 200
        assert wait_until(lambda: not router.instances()[instances.url(1)]["healthy"], 5)
        assert healthy(router.url)
        before = router.metric("pdserve_router_requests_routed_total", instance=instances.url(1))
    finally:
        instances.restart(1)
    assert wait_until(lambda: router.instances()[instances.url(1)]["healthy"], 15)
    for _ in range(4):
        assert httpx.post(f"{router.url}/v1/completions", json=body, timeout=60).status_code == 200
    assert router.metric("pdserve_router_requests_routed_total", instance=instances.url(1)) >= before + 2


def test_stream_ends_with_error_when_instance_dies(
    instances: Instances, start_router: Callable[..., Router]
) -> None:
    router = start_router(*colocated(instances, 1))
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once", "max_tokens": 400, "ignore_eos": True}
    events: list[Any] = []
    with httpx.stream("POST", f"{router.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        stream = sse_events(r)
        events += [next(stream), next(stream)]
        instances.kill(1)  # the `instances` fixture starts it again for a later test that needs it
        killed = time.monotonic()
        events += list(stream)
    assert time.monotonic() - killed < 15
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "instance_failed", events[-3:]
    assert events[-1] == "[DONE]" and events[-2] is errors[0]


# ---- disaggregated, through fake instances ----------------------------------------------------------------


@dataclass
class FakeCluster:
    """Fake prefill instances and one fake decode instance that follows the kv_transfer_params contract."""

    prefill_ports: list[int]
    decode_port: int
    failing: set[str] = field(default_factory=set)  # prefill kv_addrs whose prefill "fails"
    seen: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)

    def kv_addr(self, i: int) -> str:
        return f"tcp://127.0.0.1:{self.prefill_ports[i] + 1}"


def _fake_prefill(cluster: FakeCluster, i: int) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/pd/info")
    async def info() -> dict[str, Any]:
        load = {
            "num_running": 0,
            "num_waiting": 0,
            "num_free_blocks": 10,
            "num_blocks": 10,
            "num_waiting_for_kv": 0,
            "tokens_in_flight": 0,
        }
        return {"role": "prefill", "model": "fake", "kv_addr": cluster.kv_addr(i), "load": load}

    return app


def _fake_decode(cluster: FakeCluster) -> FastAPI:
    app = FastAPI()
    failed = {
        "error": {"message": "prefill died", "type": "server_error", "param": None, "code": "prefill_failed"}
    }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/pd/info")
    async def info() -> dict[str, Any]:
        return {"role": "decode", "model": "fake", "kv_addr": None, "load": {"num_free_blocks": 10}}

    @app.post("/v1/chat/completions")
    async def chat(raw: Request) -> Any:
        body = await raw.json()
        cluster.seen.append(body)
        cluster.authorizations.append(raw.headers.get("authorization"))
        failing = body["kv_transfer_params"]["prefill_kv_addr"] in cluster.failing
        if not body.get("stream"):
            if failing:
                return JSONResponse(failed, status_code=502)
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello world"}}]}

        async def events() -> AsyncIterator[str]:
            yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
            if failing:
                yield f"data: {json.dumps(failed)}\n\n"
            else:
                for piece in ("hello", " world"):
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    cluster = FakeCluster([free_port(), free_port()], free_port())
    apps = [(_fake_prefill(cluster, i), port) for i, port in enumerate(cluster.prefill_ports)]
    apps.append((_fake_decode(cluster), cluster.decode_port))
    servers = [uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning")) for app, port in apps]
    threads = [threading.Thread(target=s.run, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: all(s.started for s in servers), 10)
        yield cluster
    finally:
        for s in servers:
            s.should_exit = True
        for t in threads:
            t.join(10)


def test_disaggregated_request_carries_kv_transfer_params(
    fake_cluster: FakeCluster, start_router: Callable[..., Router]
) -> None:
    p = [f"http://127.0.0.1:{port}" for port in fake_cluster.prefill_ports]
    router = start_router("--prefill", *p, "--decode", f"http://127.0.0.1:{fake_cluster.decode_port}")
    body = {"model": "fake", "messages": CHAT, "max_tokens": 3, "extra": [1, {"x": None}]}
    for key in ("one", "two"):  # the client's credentials go on: instances may want the key too
        headers = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(f"{router.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert (
            answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hello world"
        )
    assert fake_cluster.authorizations == ["Bearer one", "Bearer two"]
    params = [seen.pop("kv_transfer_params") for seen in fake_cluster.seen]
    assert fake_cluster.seen == [body, body]  # the client's body, unchanged but for the one field
    assert {x["prefill_kv_addr"] for x in params} == {fake_cluster.kv_addr(0), fake_cluster.kv_addr(1)}
    assert {x["prefill_url"] for x in params} == set(p)  # round robin: each prefill once
    for x in params:  # the address and the URL of the same prefill instance
        assert x["prefill_kv_addr"] == fake_cluster.kv_addr(p.index(x["prefill_url"]))


def test_prefill_failure_is_retried_once_on_another_prefill(
    fake_cluster: FakeCluster, start_router: Callable[..., Router]
) -> None:
    p = [f"http://127.0.0.1:{port}" for port in fake_cluster.prefill_ports]
    router = start_router("--prefill", *p, "--decode", f"http://127.0.0.1:{fake_cluster.decode_port}")
    fake_cluster.failing.add(fake_cluster.kv_addr(0))
    body = {"model": "fake", "messages": CHAT, "max_tokens": 3}
    for _ in range(2):  # round robin: one of them meets the failing prefill first
        answer = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        with httpx.stream("POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}) as r:
            events = list(sse_events(r))
        preambles = [e for e in events if e != "[DONE]" and e["choices"][0]["delta"].get("role")]
        assert len(preambles) == 1 and not any(e != "[DONE]" and "error" in e for e in events), events
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]")
        assert text == "hello world" and events[-1] == "[DONE]"
    met_failing = sum(
        1
        for seen in fake_cluster.seen
        if seen["kv_transfer_params"]["prefill_kv_addr"] in fake_cluster.failing
    )
    assert met_failing >= 2 and len(fake_cluster.seen) == 4 + met_failing
    assert router.metric("pdserve_router_retries_total", reason="prefill_failed") == met_failing

    fake_cluster.failing.add(fake_cluster.kv_addr(1))  # every prefill fails: the client sees the error
    answer = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=10)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "prefill_failed"
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}) as r:
        events = list(sse_events(r))
    assert [e["error"]["code"] for e in events if e != "[DONE]" and "error" in e] == ["prefill_failed"]
    assert events[-1] == "[DONE]"


# ---- pdserve up ------------------------------------------------------------------------------------------


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float, seen: list[str]) -> re.Match[str]:
    """Read the launcher's stdout lines (into `seen`) until one matches; fail on timeout or exit."""
    found: list[re.Match[str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                found.append(match)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no line matching {pattern!r} in {timeout}s:\n{''.join(seen)}"
    return found[0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"  # a zombie is gone but for its parent's wait
    return False


@contextlib.contextmanager
def launcher(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[int], str, list[str]]]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "up",
        "--port",
        str(port),
        "--log-dir",
        str(tmp_path / "logs"),
        *args,
        "--num-blocks",
        NUM_BLOCKS,
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen: list[str] = []
    pids: list[int] = []
    try:
        url = _read_until(proc, r"pdserve is up: (\S+)", READY_TIMEOUT_S, seen).group(1)
        pids = [int(m) for m in re.findall(r"pid (\d+)", "".join(seen))]
        yield proc, pids, url, seen
    finally:
        for pid in [proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(10)


def test_up_starts_serves_and_stops_everything(tmp_path: Path) -> None:
    with launcher(tmp_path, "--instances", "2") as (proc, pids, url, seen):
        assert len(pids) == 3, "".join(seen)  # two instances and the router
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        answer = client.completions.create(model=client.models.list().data[0].id, prompt="Hi", max_tokens=2)
        assert answer.choices[0].text is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert wait_until(lambda: all(_gone(pid) for pid in pids), 5), [p for p in pids if not _gone(p)]


def test_up_children_stop_when_the_launcher_is_killed(tmp_path: Path) -> None:
    with launcher(tmp_path, "--instances", "1") as (proc, pids, _, seen):
        assert len(pids) == 2, "".join(seen)
        proc.kill()  # SIGKILL: no cleanup code runs; the kernel's PR_SET_PDEATHSIG must stop them
        proc.wait(10)
        assert wait_until(lambda: all(_gone(pid) for pid in pids), 30), [p for p in pids if not _gone(p)]

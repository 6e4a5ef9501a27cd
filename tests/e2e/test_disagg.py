"""Prefill/decode disaggregation end to end: real `pdserve` processes, real KV over TCP, real clients.

1P1D is started by `pdserve up`; 2P2D (two prefill, two decode instances and a router) by hand; a third
cluster spans two network namespaces joined by a veth pair, so KV crosses a (virtual) network. Greedy
answers must be token-identical to the colocated offline engine (`pdserve.LLM`, itself proven equal to
transformers in tests/engine) and, for a few prompts, to transformers' generate() directly. Every test
checks that KV really moved (the decode instance never runs a prompt through its model; the prefill
instance runs exactly the prompt tokens it did not find in its prefix cache) and that every KV pool
is fully free afterwards. Faults: a client that leaves mid-stream, a stopped (SIGSTOP) prefill, a
decode or prefill killed with SIGKILL, an instance restarted on its old HTTP port, an idle KV link,
a prefill instance too busy to answer health checks quickly.

Processes run in their own process groups and are killed with them at teardown, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import (
    MODEL,
    ROOT,
    Endpoint,
    Instance,
    Launched,
    NetnsPair,
    Router,
    pdserve_up,
    run_workload,
    wait_until,
)

POOL_FREE_S = 5.0  # an instance's KV pool is free this soon after its last request ended
KV_IDLE_S = 35.0  # longer than any idle timeout the KV data link may have (tcp.py: 30 s)

# ---- the workload: mixed lengths, chat and completions, about half streamed ----------------------------

_STORY = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning "
    "walked down to the harbour before sunrise, mended his nets, and talked to the gulls. "
)
PROMPTS = [
    "Hi",
    "The capital of France is",
    "List three colors:",
    "Q: What is 12 times 7?\nA:",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import numpy as np\nx = np.arange(10)\nprint(",
    "Translate to French: I like apples.",
    "Écris une phrase en français sur le café ☕ et",
    "The quick brown fox jumps over the lazy dog. " * 6 + "Why",
    _STORY + "One day he found",
    _STORY * 3 + "The gulls said",
    "Write a limerick about a cat who loves the rain, and explain why it rhymes:",
    "1, 2, 3, 5, 8, 13, 21, 34,",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain gravity."}],
    [{"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
    ],
    [{"role": "user", "content": "Summarize this story: " + _STORY * 2}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Give me a Python one-liner that reverses a string."}],
    [{"role": "user", "content": "Why is the sky blue? " * 4}],
    [{"role": "user", "content": "Count from one to five."}],
    [{"role": "user", "content": "What do fish eat?"}],
    [{"role": "user", "content": "Tell me a joke about computers."}],
]


def workload(n: int = 52, offset: int = 0) -> list[dict[str, Any]]:
    """n requests: chat and completions alternate, every other pair streamed, max_tokens 8, 12 or 16
    (few values: the colocated reference runs one batch per value)."""
    specs = []
    for i in range(offset, offset + n):
        spec: dict[str, Any] = {"max_tokens": (8, 12, 16)[i % 3], "stream": (i // 2) % 2 == 0}
        if i % 2 == 0:
            spec.update(kind="completion", prompt=PROMPTS[(i // 2) % len(PROMPTS)])
        else:
            spec.update(kind="chat", messages=CHATS[(i // 2) % len(CHATS)])
        specs.append(spec)
    return specs


def _key(spec: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in spec.items() if k != "stream"}, sort_keys=True)


class Reference:
    """The colocated offline engine in this process; greedy results cached per request (workload() repeats
    its requests, but for "stream", every 2 * len(PROMPTS) * 3 of them)."""

    def __init__(self, model_dir: str) -> None:
        from pdserve import LLM

        self.llm = LLM(model_dir, num_blocks=512)
        self.cache: dict[str, Any] = {}
        # Every request the tests send, computed now: no KV link sits idle while this process computes.
        self.expected(workload(2 * len(PROMPTS) * 3))

    def prompt_ids(self, spec: dict[str, Any]) -> list[int]:
        if spec["kind"] == "chat":
            return self.llm.apply_chat_template(spec["messages"])
        return list(self.llm.tokenizer.encode(spec["prompt"]))

    def expected(self, specs: list[dict[str, Any]]) -> list[Any]:
        from pdserve import SamplingParams

        todo: dict[int, list[dict[str, Any]]] = {}
        for spec in specs:
            if _key(spec) not in self.cache:
                todo.setdefault(spec["max_tokens"], []).append(spec)
        for max_tokens, group in todo.items():  # one batch per max_tokens
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            outs = self.llm.generate_ids([self.prompt_ids(s) for s in group], params)
            for spec, out in zip(group, outs, strict=True):
                self.cache[_key(spec)] = out
        assert self.llm.check_pool_free()
        return [self.cache[_key(s)] for s in specs]


def log_warnings(log_dir: Path, since: float | None = None, limit: int = 30) -> str:
    """The warnings and errors in the instances' and routers' logs (logged after `since`, a time.time()),
    to explain a failure."""
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since is not None else ""
    lines = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if (" WARNING " in line or " ERROR " in line) and line[: len(start)] >= start:
                lines.append(f"{path.name}: {line}")
    return "\n".join(lines[-limit:])


def check_equal(
    reference: Reference,
    specs: list[dict[str, Any]],
    results: list[Any],
    log_dir: Path | None = None,
    since: float | None = None,
) -> None:
    """Every answer is token-identical to the colocated engine's: same text, same token counts."""
    expected = reference.expected(specs)
    bad = []
    for i, (spec, got, want) in enumerate(zip(specs, results, expected, strict=True)):
        if not isinstance(got, dict):
            bad.append(f"#{i} {spec['kind']} stream={spec['stream']}: {got}")
            continue
        same = (
            got["text"] == want.text
            and got["prompt_tokens"] == len(want.prompt_token_ids)
            and got["completion_tokens"] == len(want.token_ids)
        )
        if not same:
            bad.append(
                f"#{i} {spec['kind']} stream={spec['stream']}: got {got['text']!r} "
                f"({got['prompt_tokens']}+{got['completion_tokens']} tokens), colocated {want.text!r} "
                f"({len(want.prompt_token_ids)}+{len(want.token_ids)} tokens)"
            )
    logs = f"\nlog warnings:\n{log_warnings(log_dir, since)}" if log_dir is not None else ""
    assert not bad, f"{len(bad)} of {len(specs)} answers differ from colocated:\n" + "\n".join(bad) + logs


def computed_prompt_tokens(results: list[dict[str, Any]]) -> int:
    """Prompt tokens a prefill instance must have run: all but those found in its prefix cache."""
    return sum(r["prompt_tokens"] - r["cached_tokens"] for r in results)


def assert_pools_free(*endpoints: Endpoint, timeout: float = POOL_FREE_S) -> None:
    for endpoint in endpoints:
        kv = endpoint.wait_pool_free(timeout)
        assert kv["pool_free"] and kv["num_free_blocks"] == kv["num_blocks"], f"{endpoint.url}: {kv}"


def settle(router_url: str, timeout: float = 15.0) -> None:
    """Wait until the router counts every instance healthy (a busy one may have been marked down)."""

    def all_healthy() -> bool:
        instances = httpx.get(f"{router_url}/router/instances", timeout=5).json()["instances"]
        return all(i["healthy"] for i in instances)

    assert wait_until(all_healthy, timeout), httpx.get(f"{router_url}/router/instances", timeout=5).text


def run(v1_url: str, specs: list[dict[str, Any]], timeout: float = 90.0) -> list[Any]:
    return asyncio.run(run_workload(v1_url, specs, timeout))


def sse_events(response: httpx.Response) -> Iterator[Any]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> str:
    from pdserve.models.prepare import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def reference(model_dir: str) -> Reference:
    return Reference(model_dir)


class UpCluster:
    """`pdserve up --prefill 1 --decode 1`: its router, its two instances, and when KV last moved."""

    def __init__(self, launched: Launched, log_dir: Path) -> None:
        self.launched = launched
        self.log_dir = log_dir
        self.router = launched.router_url
        self.v1 = launched.router_v1
        self.prefill = Endpoint(launched.url("prefill-0"))
        self.decode = Endpoint(launched.url("decode-0"))
        self.prefill_pid = launched.pid("prefill-0")
        self.last_used = time.monotonic()
        self.used = False  # no KV has moved yet: there is no KV link to leave idle

    def run(self, specs: list[dict[str, Any]], timeout: float = 90.0) -> list[Any]:
        try:
            return run(self.v1, specs, timeout)
        finally:
            self.last_used = time.monotonic()
            self.used = True


@pytest.fixture(scope="module")
def up1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpCluster]:
    args = ["--prefill", "1", "--decode", "1", "--num-blocks", "256", "--device", "cpu"]
    args += ["--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    log_dir = tmp_path_factory.mktemp("up1")
    with pdserve_up(log_dir, *args, "--health-interval", "0.5") as launched:
        assert set(launched.children) == {"prefill-0", "decode-0", "router"}, launched.output()
        yield UpCluster(launched, log_dir)


class PD2:
    """Two prefill and two decode instances started by hand, and a router in front of them."""

    def __init__(self, model: str, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.prefills = [Instance(f"prefill-{i}", "prefill", model, log_dir) for i in range(2)]
        self.decodes = [Instance(f"decode-{i}", "decode", model, log_dir) for i in range(2)]
        self.routers: list[Router] = []

    @property
    def instances(self) -> list[Instance]:
        return [*self.prefills, *self.decodes]

    def router(self, health_interval: float = 0.5) -> Router:
        router = Router(
            self.log_dir / f"router-{len(self.routers)}.log",
            [p.url for p in self.prefills],
            [d.url for d in self.decodes],
            health_interval,
        )
        self.routers.append(router)
        router.start().wait_healthy()
        return router

    def stop(self) -> None:
        for proc in [*self.routers, *self.instances]:
            with contextlib.suppress(Exception):
                proc.stop()


@pytest.fixture(scope="module")
def pd2(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PD2, Router]]:
    cluster = PD2(model_dir, tmp_path_factory.mktemp("pd2"))
    try:
        for instance in cluster.instances:
            instance.start()
        for instance in cluster.instances:
            instance.wait_ready()
        yield cluster, cluster.router()
    finally:
        cluster.stop()


# ---- 1P1D, started by `pdserve up` --------------------------------------------------------------------


def test_1p1d_concurrent_requests_equal_colocated_and_kv_moved(up1: UpCluster, reference: Reference) -> None:
    settle(up1.router)
    specs = workload(52)
    prefill_before = up1.prefill.prefill_tokens()
    started = time.monotonic()
    results = up1.run(specs)
    seconds = time.monotonic() - started
    check_equal(reference, specs, results, up1.log_dir)
    # KV moved: decode ran no prompt token through its model; prefill ran every one not in its cache
    assert up1.decode.prefill_tokens() == 0
    computed = up1.prefill.prefill_tokens() - prefill_before
    assert computed > 0 and computed == computed_prompt_tokens(results), (computed, results)
    assert up1.decode.metric("pdserve_kv_transfer_bytes_total", direction="received") > 0
    assert_pools_free(up1.decode, up1.prefill)
    print(f"1P1D: {len(specs)} concurrent requests in {seconds:.1f}s; prefill computed {computed} tokens")


def test_1p1d_api_surface_through_the_hand_off(up1: UpCluster, model_dir: str) -> None:
    """Issue 27 through the router and a hand-off: logit_bias reaches the prefill instance (it draws
    the first token) and the decode instance; a prompt batch with n = 2; the decode instance parses."""
    from transformers import AutoTokenizer

    banana = AutoTokenizer.from_pretrained(model_dir).encode(" banana", add_special_tokens=False)[0]
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0.0}
    r = httpx.post(f"{up1.v1}/completions", json={**body, "logit_bias": {str(banana): 100}}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " banana" * 2, r.text
    single = httpx.post(f"{up1.v1}/completions", json=body, timeout=60).json()["choices"][0]["text"]
    batch = httpx.post(
        f"{up1.v1}/completions", json={**body, "prompt": [body["prompt"]] * 2, "n": 2}, timeout=60
    )
    assert [c["text"] for c in batch.json()["choices"]] == [single] * 4, batch.text
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "tools": [tool]}
    r = httpx.post(f"{up1.v1}/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == [], r.text
    up1.used = True


def test_1p1d_kv_metrics_count_each_transfer_once(up1: UpCluster) -> None:
    """Reading /debug/kv takes no transfer time from /metrics, and the router counts each KV byte once
    (where it arrives), not once per instance it passed (issue 29, item 7)."""
    transfers = lambda: up1.decode.metric("pdserve_kv_transfer_seconds_count")  # noqa: E731
    before = transfers()
    results = up1.run(workload(2))
    assert all(isinstance(r, dict) for r in results), results
    for _ in range(2):  # readers of the engine's stats besides /metrics
        up1.decode.kv()
    assert transfers() == before + 2
    router = Endpoint(up1.router)
    moved = up1.decode.metric("pdserve_kv_transfer_bytes_total", direction="received")
    assert moved > 0 and router.metric("pdserve_router_kv_transfer_bytes_total") == moved
    assert router.metric("pdserve_router_kv_transfer_seconds_count") == transfers()


def test_1p1d_greedy_equals_transformers(up1: UpCluster, reference: Reference, model_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    specs = [s for s in workload(26) if s["kind"] == "completion"][:4]
    specs.append({**workload(2)[1], "max_tokens": 16})  # one chat
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_ids = []
    with torch.inference_mode():  # first, so that no KV link sits idle meanwhile
        for spec in specs:
            x = torch.tensor([reference.prompt_ids(spec)])
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=spec["max_tokens"], do_sample=False
            )
            hf_ids.append(y[0, x.shape[1] :].tolist())
    settle(up1.router)
    wall = time.time()
    results = up1.run(specs)
    check_equal(reference, specs, results, up1.log_dir, wall)
    tokenizer = reference.llm.tokenizer
    for spec, got, ours, theirs in zip(specs, results, reference.expected(specs), hf_ids, strict=True):
        assert ours.token_ids == theirs, (spec, ours.token_ids, theirs)
        text = tokenizer.decode(theirs, skip_special_tokens=True)
        assert got["text"] == text, (spec, got["text"], text)
        assert got["completion_tokens"] == len(theirs)
        assert got["prompt_tokens"] == len(reference.prompt_ids(spec))
    assert up1.decode.prefill_tokens() == 0
    assert_pools_free(up1.decode, up1.prefill)


async def burst_with_probes(v1: str, prompts: list[str]) -> tuple[list[Any], list[Any]]:
    """Long prompts at once, and meanwhile a small request every 0.2 s: (burst answers, probe answers)."""

    async def post(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Any:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        answer = await client.post(f"{v1}/completions", json=body)
        return answer.status_code, answer.text[:160]

    async with httpx.AsyncClient(timeout=90) as client:
        burst = asyncio.ensure_future(
            asyncio.gather(*(post(client, p, 4) for p in prompts), return_exceptions=True)
        )
        probes = []
        while not burst.done():
            probes.append(asyncio.create_task(post(client, "Hi", 2)))
            await asyncio.sleep(0.2)
        return await burst, await asyncio.gather(*probes, return_exceptions=True)


def test_1p1d_busy_prefill_stays_in_rotation(up1: UpCluster) -> None:
    """A prefill instance that is busy (not dead) keeps serving: requests arriving meanwhile are not 503.

    Eight distinct ~360-token prompts fill two prefill steps of 2048 tokens, each longer than a second
    on CPU; small requests keep arriving meanwhile."""
    settle(up1.router)
    wall = time.time()
    prompts = [f"Story {i}. " + _STORY * 8 + "The end." for i in range(8)]
    try:
        burst, probes = asyncio.run(burst_with_probes(up1.v1, prompts))
    finally:
        up1.last_used, up1.used = time.monotonic(), True
    failed = [a for a in burst if not (isinstance(a, tuple) and a[0] == 200)]
    refused = [p for p in probes if not (isinstance(p, tuple) and p[0] == 200)]
    assert not failed and not refused, (
        f"{len(failed)} of {len(burst)} long requests and {len(refused)} of {len(probes)} small requests "
        f"sent while the prefill was busy failed: {(failed + refused)[:3]}\n"
        f"log warnings:\n{log_warnings(up1.log_dir, wall)}"
    )
    assert up1.decode.prefill_tokens() == 0
    assert_pools_free(up1.decode, up1.prefill)


def test_1p1d_client_disconnect_mid_stream_frees_every_pool(up1: UpCluster) -> None:
    settle(up1.router)
    generated_before = up1.decode.metric("pdserve_generation_tokens_total")
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}
    wall = time.time()
    with httpx.stream("POST", f"{up1.v1}/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        try:
            first = next(e for e in sse_events(response) if isinstance(e, dict) and e["choices"][0]["text"])
        except httpx.ReadTimeout:
            pytest.fail(f"no first token in 30s\nlog warnings:\n{log_warnings(up1.log_dir, wall)}")
        assert "error" not in first
    left = time.monotonic()
    assert_pools_free(up1.decode, up1.prefill)
    up1.last_used, up1.used = time.monotonic(), True
    print(f"pools free {time.monotonic() - left:.2f}s after the client left")
    time.sleep(0.5)
    generated = up1.decode.metric("pdserve_generation_tokens_total") - generated_before
    assert 1 <= generated < 200, f"decode generated {generated} tokens for a client that left"
    assert up1.decode.prefill_tokens() == 0


def test_1p1d_instances_refuse_forged_kv_transfer_params(up1: UpCluster, reference: Reference) -> None:
    """A client that reaches an instance directly can neither hand it the fields instances make for
    each other (decode_addr, transfer_id, block_ids: the prefill engine used to die of the first) nor an
    address zmq refuses (it used to end the KV control thread): 400 in OpenAI's shape, param
    kv_transfer_params, and both instances go on serving disaggregated requests."""
    settle(up1.router)
    prefill_kv = up1.prefill.info()["kv_addr"]
    forged = [
        (up1.prefill, {"decode_addr": "x"}),
        (up1.prefill, {"decode_addr": "tcp://127.0.0.1:1", "transfer_id": "t", "block_ids": [0]}),
        (up1.decode, {"prefill_kv_addr": prefill_kv, "block_ids": [0]}),
        (up1.decode, {"prefill_kv_addr": "garbage"}),
        (up1.decode, {"prefill_kv_addr": "tcp://127.0.0.1:70000"}),
        (up1.prefill, {"prefill_kv_addr": prefill_kv}),  # a prefill instance takes KV from nobody
    ]
    for endpoint, params in forged:
        for stream in (False, True):
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": stream}
            body["kv_transfer_params"] = params
            answer = httpx.post(f"{endpoint.url}/v1/completions", json=body, timeout=30)
            assert answer.status_code == 400, (params, answer.text)
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "invalid_request_error" and error["param"] == "kv_transfer_params", error
    assert up1.prefill.get("/health").status_code == 200 and up1.decode.get("/health").status_code == 200
    specs = workload(6)
    check_equal(reference, specs, up1.run(specs), up1.log_dir)
    assert up1.decode.prefill_tokens() == 0
    assert_pools_free(up1.decode, up1.prefill)


async def unary_and_stream(url: str, body: dict[str, Any], timeout: float) -> tuple[Any, list[Any], float]:
    """The same request twice at once, plain and streamed: the answer, the SSE events, the seconds."""
    body = {"model": MODEL, "temperature": 0.0, **body}
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout) as client:

        async def streamed() -> list[Any]:
            async with client.stream("POST", url, json={**body, "stream": True}) as response:
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            return [x[6:] if x[6:] == "[DONE]" else json.loads(x[6:]) for x in lines]

        answer, events = await asyncio.gather(client.post(url, json=body), streamed())
    return answer, events, time.monotonic() - started


def test_1p1d_stopped_prefill_fails_request_then_recovers(up1: UpCluster, reference: Reference) -> None:
    settle(up1.router)
    specs = workload(1)
    check_equal(reference, specs, up1.run(specs), up1.log_dir)  # the KV link is up
    os.killpg(up1.prefill_pid, signal.SIGSTOP)
    try:
        body = {"prompt": "Hello there", "max_tokens": 8}
        answer, events, seconds = asyncio.run(unary_and_stream(f"{up1.v1}/completions", body, 30))
        assert answer.status_code == 502 and answer.json()["error"]["code"] == "prefill_failed", answer.text
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert [e["error"]["code"] for e in errors] == ["prefill_failed"], events
        assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and e.get("choices") for e in events)
        assert seconds < 15, f"the errors took {seconds:.1f}s"
        assert_pools_free(up1.decode)
    finally:
        os.killpg(up1.prefill_pid, signal.SIGCONT)
        up1.last_used = time.monotonic()
    print(f"stopped prefill: 502 and an SSE error, prefill_failed, after {seconds:.1f}s")
    assert_pools_free(up1.prefill, up1.decode)

    settle(up1.router)  # the router's health checks timed out meanwhile
    specs = workload(4, offset=10)
    check_equal(reference, specs, up1.run(specs, timeout=60), up1.log_dir)
    assert up1.decode.prefill_tokens() == 0
    assert_pools_free(up1.prefill, up1.decode)


# ---- 2P2D, started by hand -----------------------------------------------------------------------------


def test_2p2d_concurrent_requests_equal_colocated_and_spread(
    pd2: tuple[PD2, Router], reference: Reference
) -> None:
    cluster, router = pd2
    settle(router.url)
    specs = workload(52, offset=3)
    before = {p.url: p.prefill_tokens() for p in cluster.prefills}
    received = "pdserve_kv_transfer_bytes_total"
    bytes_before = {d.url: d.metric(received, direction="received") for d in cluster.decodes}
    started = time.monotonic()
    results = run(f"{router.url}/v1", specs)
    seconds = time.monotonic() - started
    check_equal(reference, specs, results, cluster.log_dir)
    computed = {p.url: p.prefill_tokens() - before[p.url] for p in cluster.prefills}
    assert all(n > 0 for n in computed.values()), computed  # both prefills got work
    assert sum(computed.values()) == computed_prompt_tokens(results), (computed, results)
    for d in cluster.decodes:  # both decodes got work, and took all of it as KV
        assert d.metric(received, direction="received") > bytes_before[d.url], d.url
        assert d.prefill_tokens() == 0, d.url
    routed = {url: i["routed"] for url, i in router.instances().items()}
    assert all(n > 0 for n in routed.values()), routed
    assert_pools_free(*cluster.instances)
    print(f"2P2D: {len(specs)} requests in {seconds:.1f}s; prefill tokens {computed}; routed {routed}")


def test_2p2d_decode_killed_mid_stream_then_restarted(pd2: tuple[PD2, Router], reference: Reference) -> None:
    cluster, router = pd2
    settle(router.url)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}
    events: list[Any] = []
    wall = time.time()
    with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=30) as response:
        stream = sse_events(response)
        while not any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["text"] for e in events):
            try:
                events.append(next(stream))
            except httpx.ReadTimeout:
                pytest.fail(f"no first token in 30s\nlog warnings:\n{log_warnings(cluster.log_dir, wall)}")
        serving = [d for d in cluster.decodes if router.instances()[d.url]["inflight"] > 0]
        assert len(serving) == 1, router.instances()
        victim = serving[0]
        assert victim.proc is not None
        victim.proc.kill()
        killed = time.monotonic()
        events += list(stream)
        seconds = time.monotonic() - killed
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    # issue 25: the router resumes the stream on the other decode instance; the client sees no error
    assert errors == [] and events.count("[DONE]") == 1 and events[-1] == "[DONE]", events[-3:]
    assert router.metric("pdserve_router_resumes_total", outcome="resumed") >= 1
    assert seconds < 60, f"the stream took {seconds:.1f}s to end"
    print(f"decode killed: stream resumed and ended {seconds:.2f}s later")
    others = [i for i in cluster.instances if i is not victim]
    assert_pools_free(*others)

    victim.restart()  # the same HTTP port, new KV ports
    restarted = time.monotonic()
    assert wait_until(lambda: router.instances()[victim.url]["healthy"], 5), router.instances()
    print(f"restarted decode back in the rotation {time.monotonic() - restarted:.2f}s after it was healthy")
    routed_before = router.instances()[victim.url]["routed"]
    specs = workload(4, offset=30)
    check_equal(reference, specs, run(f"{router.url}/v1", specs, timeout=60), cluster.log_dir)
    assert router.instances()[victim.url]["routed"] > routed_before
    assert victim.metric("pdserve_kv_transfer_bytes_total", direction="received") > 0
    assert victim.prefill_tokens() == 0
    assert_pools_free(*cluster.instances)


def test_2p2d_prefill_killed_requests_retried_then_restarted(
    pd2: tuple[PD2, Router], reference: Reference
) -> None:
    cluster, router = pd2
    settle(router.url)
    slow_router = cluster.router(health_interval=60)  # polls only at start: it meets the dead prefill
    settle(slow_router.url)
    victim, survivor = cluster.prefills
    assert victim.proc is not None
    old_kv_addr = victim.info()["kv_addr"]
    survivor_before = survivor.prefill_tokens()
    victim.proc.kill()
    specs = workload(6, offset=40)
    started = time.monotonic()
    results = run(f"{slow_router.url}/v1", specs, timeout=60)
    seconds = time.monotonic() - started
    check_equal(reference, specs, results, cluster.log_dir)
    retries = slow_router.metric("pdserve_router_retries_total", reason="prefill_failed")
    assert retries >= 1, slow_router.proc.log()
    assert survivor.prefill_tokens() - survivor_before == computed_prompt_tokens(results)
    print(f"prefill killed: {len(specs)} requests ok in {seconds:.1f}s with {retries:.0f} retries")
    assert_pools_free(survivor, *cluster.decodes)

    assert wait_until(lambda: not router.instances()[victim.url]["healthy"], 5)
    victim.restart()  # the same HTTP port, new KV ports
    new_kv_addr = victim.info()["kv_addr"]
    assert new_kv_addr != old_kv_addr
    restarted = time.monotonic()

    def back() -> bool:
        seen = router.instances()[victim.url]
        return bool(seen["healthy"]) and seen["kv_addr"] == new_kv_addr

    assert wait_until(back, 5), router.instances()
    print(f"restarted prefill back in the rotation {time.monotonic() - restarted:.2f}s after it was healthy")
    specs = workload(4, offset=46)
    check_equal(reference, specs, run(f"{router.url}/v1", specs, timeout=60), cluster.log_dir)
    assert victim.prefill_tokens() > 0  # a new process: all of it since the restart
    assert all(d.prefill_tokens() == 0 for d in cluster.decodes)
    assert_pools_free(*cluster.instances)


# ---- across hosts: two network namespaces ----------------------------------------------------------------


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2 is not installed): cannot create network namespaces")
    tag = uuid.uuid4().hex[:8]
    pair = NetnsPair(f"pdA-{os.getpid()}-{tag}", f"pdB-{os.getpid()}-{tag}")
    try:
        pair.create()
    except (OSError, subprocess.SubprocessError) as e:
        pair.delete()
        pytest.skip(f"cannot create network namespaces: {e}")
    try:
        yield pair
    finally:
        pair.delete()


def test_across_network_namespaces(
    netns_pair: NetnsPair, model_dir: str, reference: Reference, tmp_path: Path
) -> None:
    a, b = netns_pair, NetnsPair.exec_prefix
    prefill = Instance("prefill", "prefill", model_dir, tmp_path, host=a.ip_a, prefix=b(a.a))
    decode = Instance(
        "decode",
        "decode",
        model_dir,
        tmp_path,
        extra=["--kv-host", "0.0.0.0", "--kv-advertise-host", a.ip_b],
        prefix=b(a.b),
    )
    router = Router(tmp_path / "router.log", [prefill.url], [decode.url], prefix=b(a.b))
    specs = workload(10, offset=7)
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    client = [*b(a.b), sys.executable, "-m", "tests.e2e.cluster", "client", router.url]
    client += [str(tmp_path / "specs.json"), prefill.url, decode.url]
    try:
        prefill.start()
        decode.start()
        router.start()
        done = subprocess.run(client, cwd=ROOT, capture_output=True, text=True, timeout=240)
        logs = "\n".join(p.log(2000) for p in (prefill.proc, decode.proc, router.proc) if p is not None)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
        report = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for proc in (router, decode, prefill):
            proc.stop()
    check_equal(reference, specs, report["results"], tmp_path)
    p_info, d_info = (report["instances"][u]["info"] for u in (prefill.url, decode.url))
    assert p_info["kv_addr"].startswith(f"tcp://{a.ip_a}:"), p_info
    assert d_info["kv_addr"].startswith(f"tcp://{a.ip_b}:"), d_info
    assert d_info["load"]["num_prefill_tokens"] == 0
    assert p_info["load"]["num_prefill_tokens"] == computed_prompt_tokens(report["results"]) > 0
    for url in (prefill.url, decode.url):
        assert report["instances"][url]["pool_free_in_time"], report["instances"][url]
    print(f"across namespaces: {len(specs)} requests in {report['seconds']:.1f}s")


# ---- last: by now the 1P1D cluster has been idle a while ---------------------------------------------------


def test_1p1d_transfer_after_an_idle_kv_link(up1: UpCluster, reference: Reference) -> None:
    """A decode/prefill pair that has been idle for a while must still move KV on the next request."""
    settle(up1.router)
    if not up1.used:  # run alone: open the KV link first
        check_equal(reference, workload(1), up1.run(workload(1)), up1.log_dir)
    time.sleep(max(0.0, KV_IDLE_S - (time.monotonic() - up1.last_used)))  # idle already, in a full run
    idle = time.monotonic() - up1.last_used
    wall = time.time()
    specs = workload(2, offset=20)
    started = time.monotonic()
    results = up1.run(specs, timeout=30)
    seconds = time.monotonic() - started
    late = [r for r in results if not isinstance(r, dict)]
    assert not late, (
        f"after the decode/prefill pair was idle {idle:.0f}s, {len(late)} of {len(specs)} requests did not "
        f"finish in 30s: {late}\nlog warnings:\n{log_warnings(up1.log_dir, wall)}"
    )
    check_equal(reference, specs, results, up1.log_dir)
    assert seconds < 20, f"requests after an idle KV link took {seconds:.1f}s"
    assert_pools_free(up1.prefill, up1.decode)


# ---- tensor parallel decode, started by `pdserve up` ----------------------------------------------------


def test_decode_tp2_by_pdserve_up(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> None:
    """`pdserve up --decode-tp 2`: a TP-1 prefill hands its KV to a decode instance over two CPU ranks
    (rank 0 writes every rank's KV heads); the answers equal the colocated engine's."""
    args = ["--prefill", "1", "--decode", "1", "--decode-tp", "2", "--num-blocks", "256", "--device", "cpu"]
    log_dir = tmp_path_factory.mktemp("up-decode-tp2")
    with pdserve_up(log_dir, *args) as launched:
        cluster = UpCluster(launched, log_dir)
        specs = workload(12)
        results = cluster.run(specs)
        check_equal(reference, specs, results, log_dir)
        assert cluster.decode.prefill_tokens() == 0  # every prompt's KV came from the prefill
        assert cluster.decode.metric("pdserve_kv_transfer_bytes_total", direction="received") > 0
        assert_pools_free(cluster.decode, cluster.prefill)

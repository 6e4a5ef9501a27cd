"""No router: a prefill instance and a decode instance, each started with the other's URL, are entries
of their cluster themselves (BladeLLM's way through the prefill, FastDeploy's through the decode).

One 1P1D pair serves every check, with an API key on both (and on the router in front of the same pair),
so every peer poll and every relayed request must carry the entry's own key:
    - the same greedy prompts (chat + completion, streamed and not) through the prefill instance, the
      decode instance and a router give identical answers, and each went through both instances;
      each entry also lists a peer that never answers, which it must never choose;
    - a hand-off that fails (a prefill instance that advertises a silent KV address) is retried on the
      other prefill instance, and the client sees only the right answer;
    - the prefill entry answers 503 (OpenAI's shape, code "overloaded") while the decode instance
      (--max-num-seqs 1) holds more requests waiting than --decode-max-queued (default 5) allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from tests.e2e.cluster import MODEL, Instance, Router, free_port, metric, run_one, wait_until

KEY = "entry-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SPECS: list[dict[str, Any]] = [
    {"kind": "chat", "messages": [{"role": "user", "content": "Name three colors."}], "stream": False},
    {"kind": "chat", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "stream": True},
    {"kind": "completion", "prompt": "The capital of France is", "stream": False},
    {"kind": "completion", "prompt": "def add(a, b):\n", "stream": True},
]
SPECS = [{**s, "max_tokens": 8} for s in SPECS]
DECODE_MAX_QUEUED = 5  # the default


class Pair:
    """The prefill and decode instance, each the other's peer, and a router in front of both."""

    def __init__(self, model: str, log_dir: Path) -> None:
        env = {"PDSERVE_API_KEY": KEY}
        p_port, d_port = free_port(), free_port()
        p_url, d_url = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
        self.dead = f"http://127.0.0.1:{free_port()}"  # a peer of each that never answers: never chosen
        self.prefill = Instance(
            "prefill", "prefill", model, log_dir, port=p_port, env=env,
            extra=["--decode", d_url, self.dead],  # --decode-max-queued: its default, 5
        )  # fmt: skip
        # a real prefill instance that advertises a KV address where nothing listens (a wrong
        # --kv-advertise-host): healthy to every poll, yet each hand-off to it fails
        self.misled = Instance("prefill-misled", "prefill", model, log_dir, env=env)
        self.misled.extra = ["--kv-advertise-host", "127.0.0.2"]  # its KV ports listen on 127.0.0.1
        self.decode = Instance(
            "decode", "decode", model, log_dir, port=d_port, env=env,
            extra=["--prefill", self.dead, p_url, self.misled.url, "--max-num-seqs", "1"],
        )  # fmt: skip
        self.router = Router(log_dir / "router.log", [p_url], [d_url])
        self.router.proc.env = {"PDSERVE_ROUTER_API_KEY": KEY}

    def get(self, url: str, path: str) -> Any:
        answer = httpx.get(f"{url}{path}", headers=AUTH, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def peers(self, instance: Instance) -> dict[str, dict[str, Any]]:
        return {p["url"]: p for p in self.get(instance.url, "/pd/peers")["peers"]}

    def generated(self) -> float:
        text = httpx.get(f"{self.decode.url}/metrics", headers=AUTH, timeout=10).text
        return metric(text, "pdserve_generation_tokens_total")

    def prefilled(self) -> int:
        return int(self.get(self.prefill.url, "/pd/info")["load"]["num_prefill_tokens"])

    def stop(self) -> None:
        procs = [self.router.proc] + [i.proc for i in (self.prefill, self.decode, self.misled) if i.proc]
        for proc in procs:  # all drain at once
            proc.signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    from pdserve.models.prepare import resolve_model

    pair = Pair(resolve_model(None), tmp_path_factory.mktemp("entry"))
    try:
        for instance in (pair.prefill, pair.decode, pair.misled):
            instance.start()
        for instance in (pair.prefill, pair.decode, pair.misled):
            instance.wait_ready()
        pair.router.start()
        yield pair
    finally:
        pair.stop()


def waiting(peer: dict[str, Any]) -> int:
    """Requests the decode instance holds but does not run, as the prefill entry last saw."""
    load = peer["load"] or {}
    return int(load.get("num_waiting", 0)) + int(load.get("num_waiting_for_kv", 0))


def settled(pair: Pair) -> bool:
    """Both entries see their live peer healthy (the dead one not), and the prefill entry sees no
    request waiting on the decode instance."""
    decodes, prefills = pair.peers(pair.prefill), pair.peers(pair.decode)
    alive = [decodes[pair.decode.url], prefills[pair.prefill.url], prefills[pair.misled.url]]
    dead = [decodes[pair.dead], prefills[pair.dead]]
    decode = decodes[pair.decode.url]
    alive_ok = all(p["healthy"] for p in alive) and not any(p["healthy"] for p in dead)
    return alive_ok and waiting(decode) == 0


async def run_specs(v1: str, specs: list[dict[str, Any]]) -> list[Any]:
    async with AsyncOpenAI(base_url=v1, api_key=KEY, max_retries=0, timeout=60) as client:
        answers = await asyncio.gather(*(run_one(client, s) for s in specs))
    keys = ("text", "finish_reason", "prompt_tokens", "completion_tokens")  # cached_tokens: P's own cache
    return [{k: a[k] for k in keys} for a in answers]


def test_prefill_entry_decode_entry_and_router_answer_alike(pair: Pair) -> None:
    # peers are polled with the instance's own key: the decode refuses a call without it
    assert httpx.get(f"{pair.decode.url}/pd/info", timeout=10).status_code == 401
    assert wait_until(lambda: settled(pair), 30), (pair.peers(pair.prefill), pair.peers(pair.decode))

    generated, prefilled = pair.generated(), pair.prefilled()
    through_prefill = asyncio.run(run_specs(f"{pair.prefill.url}/v1", SPECS))
    assert pair.generated() > generated, "the prefill entry answered alone: the decode generated nothing"

    prefilled = pair.prefilled()
    through_decode = asyncio.run(run_specs(f"{pair.decode.url}/v1", SPECS))
    assert pair.prefilled() > prefilled, "the decode entry computed the prompts alone"

    pair.router.wait_healthy()
    through_router = asyncio.run(run_specs(f"{pair.router.url}/v1", SPECS))
    assert through_prefill == through_router, (through_prefill, through_router)
    assert through_decode == through_router, (through_decode, through_router)
    assert all(r["completion_tokens"] > 0 for r in through_router), through_router


async def refused_while_too_many_wait(pair: Pair) -> list[httpx.Response]:
    """Hold one running and DECODE_MAX_QUEUED + 1 waiting requests on the decode instance; ask the
    prefill entry (plain and streamed) meanwhile; let the held ones go."""
    hold = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    hold["stream"] = True
    async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:

        async def held() -> None:
            async with client.stream("POST", f"{pair.decode.url}/v1/completions", json=hold) as answer:
                async for _ in answer.aiter_bytes():
                    pass

        tasks = [asyncio.create_task(held()) for _ in range(DECODE_MAX_QUEUED + 2)]
        try:
            for _ in range(300):  # until the prefill entry's view of the decode shows one waiting
                peers = (await client.get(f"{pair.prefill.url}/pd/peers")).json()["peers"]
                if any(waiting(p) > DECODE_MAX_QUEUED for p in peers):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"not enough requests waiting on the decode instance: {peers}")
            small = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
            url = f"{pair.prefill.url}/v1/completions"
            plain = await client.post(url, json=small)
            return [plain, await client.post(url, json={**small, "stream": True})]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_prefill_entry_refuses_when_every_decode_has_too_many_waiting(pair: Pair) -> None:
    assert wait_until(lambda: settled(pair), 30), pair.peers(pair.prefill)
    for answer in asyncio.run(refused_while_too_many_wait(pair)):
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert (error["code"], error["type"]) == ("overloaded", "service_unavailable_error"), error
    # the held requests are aborted: both pools come back whole, and the entry serves again
    for instance in (pair.decode, pair.prefill):
        free = wait_until(lambda i=instance: pair.get(i.url, "/debug/kv")["pool_free"], 15)
        assert free, pair.get(instance.url, "/debug/kv")
    assert wait_until(lambda: settled(pair), 15), pair.peers(pair.prefill)
    again = asyncio.run(run_specs(f"{pair.prefill.url}/v1", SPECS[2:3]))
    assert again[0]["completion_tokens"] > 0


def test_decode_entry_retries_a_failed_hand_off_on_another_prefill(pair: Pair) -> None:
    """The decode entry picks a prefill peer by load (at random between equals); a hand-off to the
    misled one fails (its KV address is silent) and is retried unseen on the other."""
    assert wait_until(lambda: settled(pair), 30), pair.peers(pair.decode)
    spec = SPECS[2]
    expected = asyncio.run(run_specs(f"{pair.router.url}/v1", [spec]))
    before = pair.peers(pair.decode)[pair.misled.url]["routed"]
    answers = []
    for _ in range(20):  # each request: one chance in two to meet the misled instance first
        answers += asyncio.run(run_specs(f"{pair.decode.url}/v1", [spec]))
        if pair.peers(pair.decode)[pair.misled.url]["routed"] > before:
            break
    assert pair.peers(pair.decode)[pair.misled.url]["routed"] > before, pair.peers(pair.decode)
    assert answers == expected * len(answers), (answers, expected)


def test_decode_entry_prefills_n_choices_once(pair: Pair) -> None:
    """n = 3 through the decode entry (issue 27): the prefill instance computes the prompt once; the
    other choices share its KV on the decode instance (tests/e2e/test_structured_output.py has the rest)."""
    assert wait_until(lambda: settled(pair), 30), pair.peers(pair.decode)
    prompt = f"Entry {uuid.uuid4().hex[:8]}: the sea, the wind, the gulls and the old boats in the harbour."
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "n": 3, "temperature": 1.0, "seed": 5}
    before = pair.prefilled()
    answer = httpx.post(f"{pair.decode.url}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 3, answer.text
    prompt_tokens = answer.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 16 and pair.prefilled() - before == prompt_tokens

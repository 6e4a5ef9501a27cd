"""The OpenAI-compatible server end to end: a real `pdserve serve` process, real clients over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import API_KEY, MODEL, ServerProcess

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0}
LONG = {"ignore_eos": True}  # extra_body: run to max_tokens


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)


def chat_text(client: OpenAI, max_tokens: int = 16, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (with `labels` inside its braces, if given) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


# ---- basics ----------------------------------------------------------------------------------------------


def test_models_health_and_kv_endpoints(server: ServerProcess, client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    kv = server.kv()
    assert kv["num_blocks"] == 512 and kv["num_free_blocks"] == 512 and kv["pool_free"] is True


def test_chat_non_stream_usage_matches_tokenizer(client: OpenAI, tokenizer: Any) -> None:
    resp = chat_text(client, max_tokens=8, extra_body=LONG, **GREEDY)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == n_prompt + 8
    assert resp.usage.prompt_tokens_details is not None
    assert 0 <= (resp.usage.prompt_tokens_details.cached_tokens or 0) <= n_prompt


def test_completion_non_stream_usage_matches_tokenizer(client: OpenAI, tokenizer: Any) -> None:
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=LONG, **GREEDY)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].text
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_completion_accepts_token_ids(client: OpenAI, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, **GREEDY)
    by_list = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=8, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text == by_list.choices[0].text


def test_eos_gives_finish_reason_stop(client: OpenAI) -> None:
    resp = chat_text(client, max_tokens=64, **GREEDY)  # the model answers briefly, then <|im_end|>
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens < 64
    assert "<|im_end|>" not in (resp.choices[0].message.content or "")


# ---- streaming -------------------------------------------------------------------------------------------


def test_chat_stream_equals_non_stream(client: OpenAI) -> None:
    full = chat_text(client, max_tokens=16, **GREEDY)
    chunks = list(chat_text(client, max_tokens=16, stream=True, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None


def test_completion_stream_equals_non_stream(client: OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, stream=True, **GREEDY))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"


def test_stream_include_usage(client: OpenAI) -> None:
    full = chat_text(client, max_tokens=8, **GREEDY)
    opts = {"include_usage": True}
    chunks = list(chat_text(client, max_tokens=8, stream=True, stream_options=opts, **GREEDY))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert full.usage is not None
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.total_tokens == full.usage.total_tokens
    comp = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, stream=True, stream_options=opts, extra_body=LONG
        )
    )
    assert comp[-1].choices == [] and comp[-1].usage is not None
    assert comp[-1].usage.completion_tokens == 8


def test_raw_sse_framing(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True, **GREEDY}
    with httpx.stream(
        "POST", f"{server.v1}/completions", json=body, headers=server.headers, timeout=300
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: ") :])["object"] == "text_completion"


# ---- stopping ------------------------------------------------------------------------------------------


def test_stop_strings_are_never_emitted(client: OpenAI) -> None:
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, extra_body=LONG, **GREEDY)
    text = base.choices[0].text
    words = [w for w in re.findall(r"[A-Za-z]{3,}", text) if text.find(w) > 0]
    assert words, f"need a word after the first character to stop on: {text!r}"
    stop = words[0]
    expected = text[: text.find(stop)]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY)
    assert resp.choices[0].text == expected and stop not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stop=stop, stream=True, **GREEDY)
    )
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client: OpenAI) -> None:
    for max_tokens in (1, 3):
        resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, extra_body=LONG)
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == max_tokens
    resp2 = chat_text(client, max_tokens=None, max_completion_tokens=2, extra_body=LONG)
    assert resp2.choices[0].finish_reason == "length"
    assert resp2.usage is not None and resp2.usage.completion_tokens == 2


# ---- n, seeds, logprobs ----------------------------------------------------------------------------------


def test_n_choices(client: OpenAI) -> None:
    kw: dict[str, Any] = {"n": 3, "temperature": 1.0, "seed": 7, "extra_body": LONG}
    first = chat_text(client, max_tokens=8, **kw)
    again = chat_text(client, max_tokens=8, **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage is not None and first.usage.completion_tokens == 24
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed, seed+1, seed+2: reproducible
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, **GREEDY)
    assert greedy.choices[0].text == greedy.choices[1].text
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, stream=True, **GREEDY)
    )
    streamed = [
        "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)
    ]
    assert streamed == [greedy.choices[0].text] * 2
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_seed_reproducibility(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        resp = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, extra_body=LONG
        )
        return resp.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_completion_logprobs_shape(client: OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3, extra_body=LONG, **GREEDY
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0 and 3 <= len(top) <= 4 and token in top
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy picks the top token
    none = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_chat_logprobs_shape(client: OpenAI) -> None:
    resp = chat_text(client, max_tokens=6, logprobs=True, top_logprobs=2, extra_body=LONG, **GREEDY)
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry in content:
        assert entry.logprob <= 0.0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    chunks = list(chat_text(client, max_tokens=6, logprobs=True, stream=True, extra_body=LONG, **GREEDY))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)  # top_logprobs not asked: none
    plain = chat_text(client, max_tokens=2)
    assert plain.choices[0].logprobs is None


# ---- concurrency -----------------------------------------------------------------------------------------


async def test_async_concurrent_requests_match_sequential(server: ServerProcess, client: OpenAI) -> None:
    prompts = [f"{i} + {i} =" for i in range(1, 7)]
    sequential = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=10, **GREEDY).choices[0].text
        for p in prompts
    ]
    aclient = AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)
    try:
        responses = await asyncio.gather(
            *(aclient.completions.create(model=MODEL, prompt=p, max_tokens=10, **GREEDY) for p in prompts),
            aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, **GREEDY),  # type: ignore[arg-type]
        )
    finally:
        await aclient.close()
    assert [r.choices[0].text for r in responses[:-1]] == sequential  # type: ignore[union-attr]
    assert responses[-1].choices[0].message.content  # type: ignore[union-attr]


# ---- observability and auth ------------------------------------------------------------------------------


METRIC_NAMES = [
    "pdserve_requests_total",
    "pdserve_time_to_first_token_seconds_bucket",
    "pdserve_time_per_output_token_seconds_bucket",
    "pdserve_e2e_request_latency_seconds_bucket",
    "pdserve_prompt_tokens_total",
    "pdserve_generation_tokens_total",
    "pdserve_num_requests_running",
    "pdserve_num_requests_waiting",
    "pdserve_kv_cache_usage_ratio",
    "pdserve_prefix_cache_hit_rate",
    "pdserve_num_steps_ahead",
]


def test_metrics_exposed_and_counting(server: ServerProcess, client: OpenAI) -> None:
    before = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, extra_body=LONG)
    r = httpx.post(f"{server.v1}/completions", json={"model": "nope", "prompt": "x"}, headers=server.headers)
    assert r.status_code == 404
    resp = httpx.get(f"{server.url}/metrics", headers=server.headers)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = resp.text
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}(\{{|\s)", after, re.M), name
    assert metric(after, "pdserve_requests_total", 'outcome="length"') >= 1 + metric(
        before, "pdserve_requests_total", 'outcome="length"'
    )
    assert metric(after, "pdserve_requests_total", 'outcome="model_not_found"') >= 1
    assert metric(after, "pdserve_generation_tokens_total") >= 5 + metric(
        before, "pdserve_generation_tokens_total"
    )
    assert metric(after, "pdserve_prompt_tokens_total") > metric(before, "pdserve_prompt_tokens_total")
    assert metric(after, "pdserve_time_to_first_token_seconds_count") > metric(
        before, "pdserve_time_to_first_token_seconds_count"
    )
    assert metric(after, "pdserve_num_requests_running") == 0.0
    # the front (arrival -> prompt in the engine) is timed once per request, and TTFT counts from the
    # same arrival, so it includes the front
    fronts = metric(after, "pdserve_request_front_seconds_count") - metric(
        before, "pdserve_request_front_seconds_count"
    )
    assert fronts == 1
    front_s = metric(after, "pdserve_request_front_seconds_sum") - metric(
        before, "pdserve_request_front_seconds_sum"
    )
    ttft_s = metric(after, "pdserve_time_to_first_token_seconds_sum") - metric(
        before, "pdserve_time_to_first_token_seconds_sum"
    )
    assert 0 < front_s < ttft_s
    assert metric(after, "pdserve_engine_device_busy_seconds") > metric(
        before, "pdserve_engine_device_busy_seconds"
    )


def test_api_key_required_on_v1(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic x"},
    ):
        for method, path in (("POST", "/completions"), ("POST", "/chat/completions"), ("GET", "/models")):
            r = httpx.request(method, f"{server.v1}{path}", json=body, headers=headers)
            assert r.status_code == 401, (headers, path)
            error = r.json()["error"]
            assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # the one route open without the key
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # unless --metrics-public
    assert httpx.get(f"{server.url}/metrics", headers=server.headers).status_code == 200
    assert httpx.get(f"{server.v1}/models", headers=server.headers).status_code == 200


# ---- disconnects and overload ----------------------------------------------------------------------------


def server_metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", headers=server.headers).text


def test_client_disconnect_mid_stream_aborts(server: ServerProcess) -> None:
    before = metric(server_metrics(server), "pdserve_requests_total", 'outcome="abort"')
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{server.v1}/chat/completions", json=body, headers=server.headers, timeout=300
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert len(got) >= 2
    kv = server.wait_pool_free()  # without the abort this request would run for minutes
    assert kv["pool_free"], kv
    after = metric(server_metrics(server), "pdserve_requests_total", 'outcome="abort"')
    assert after == before + 1


def test_client_disconnect_non_stream_aborts(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/completions", json=body, headers=server.headers, timeout=2.0)
    kv = server.wait_pool_free()
    assert kv["pool_free"], kv


async def test_overload_answers_503(small_server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{small_server.v1}/completions", json=body)

    async with httpx.AsyncClient(timeout=300) as client:
        responses = await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(8))), timeout=400)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "overloaded"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{small_server.url}/health").status_code == 200


def test_prompt_beyond_kv_pool_is_400(small_server: ServerProcess) -> None:
    # 128 blocks of 16 tokens hold 2048 tokens; the model's context is 8192.
    body = {"model": MODEL, "prompt": list(range(100, 2200)), "max_tokens": 1}
    r = httpx.post(f"{small_server.v1}/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"

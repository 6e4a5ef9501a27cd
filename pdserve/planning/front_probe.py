"""The front of a server: what one request costs outside the engine's steps (`pdserve profile --front`).

    tokenize   the model's tokenizer on prompts of N tokens, in this process (the server tokenizes on
               its event loop, before the engine sees the request): seconds by prompt tokens, fitted
               as a fixed part plus a part per token (least squares over the sizes measured)
    http       `requests` streaming completions, max_tokens 1, one at a time, against a running
               `pdserve serve`, at a short and a long prompt: the client's time to the first token
               minus the engine's own time for the same requests (its queue and prefill stage sums,
               read from /metrics before and after): HTTP in, tokenization, the hand-off to the
               engine thread, the first token's way back (detokenize, SSE, the client's read); a
               line through the two sizes: a fixed part and a part per prompt token

What the simulator adds to TTFT and end-to-end latency (profile.Front); a decode step never pays it.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pdserve.planning.profile import Front

TOKENIZE_SIZES = (16, 256, 1024, 2048)
HTTP_SIZES = (8, 1024)
STAGE_SUMS = ("pdserve_request_queue_time_seconds_sum", "pdserve_request_prefill_time_seconds_sum")
STAGE_COUNT = "pdserve_request_prefill_time_seconds_count"


def prompt_text(tokenizer: Any, num_tokens: int, rng: random.Random) -> str:
    """Text of about `num_tokens` tokens: random ids decoded, as `pdserve bench serve`'s random set."""
    ids = [rng.randrange(1000, min(len(tokenizer), 30000)) for _ in range(num_tokens)]
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def tokenize_costs(
    tokenizer: Any, sizes: Sequence[int] = TOKENIZE_SIZES, repeats: int = 7, seed: int = 0
) -> list[tuple[int, float]]:
    """(tokens, the fastest of `repeats` encodings of a prompt of that many tokens) for each size: the
    work itself, not what else the machine's cores were doing at that moment."""
    rng = random.Random(seed)
    points = []
    for n in sizes:
        text = prompt_text(tokenizer, n, rng)
        tokens = len(tokenizer.encode(text, add_special_tokens=False))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tokenizer.encode(text, add_special_tokens=False)
            times.append(time.perf_counter() - start)
        points.append((tokens, min(times)))
    return points


def fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points, neither below zero."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    if len(set(xs)) < 2:
        return max(0.0, statistics.mean(ys)), 0.0
    slope, intercept = statistics.linear_regression(xs, ys)
    return max(0.0, intercept), max(0.0, slope)


def stage_sums(metrics_text: str) -> tuple[float, float]:
    """(queue + prefill seconds summed over finished requests, how many) from a /metrics page."""
    total, count = 0.0, 0.0
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{")[0] in STAGE_SUMS:
            total += float(value)
        elif name.split("{")[0] == STAGE_COUNT:
            count += float(value)
    return total, count


def http_overhead(
    base_url: str,
    prompt: str,
    requests: int = 20,
    api_key: str | None = None,
    metrics_url: str | None = None,
    timeout: float = 60.0,
) -> dict[str, float]:
    """Client TTFT vs the engine's queue + prefill for `requests` one-token streamed completions.
    `metrics_url`: the instance whose engine answers, where `base_url` is a router in front of it."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    metrics = f"{metrics_url or base_url}/metrics"
    with httpx.Client(base_url=base_url, timeout=timeout, headers=headers) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0.0}
        _first_token(client, body)  # warm-up: the connection, the first request's one-off costs
        engine_before, count_before = stage_sums(client.get(metrics).text)
        ttfts = [_first_token(client, body) for _ in range(requests)]
        engine_after, count_after = stage_sums(client.get(metrics).text)
    done = count_after - count_before
    if done != requests:
        raise RuntimeError(f"the server's /metrics counted {done:g} requests finished, not {requests}")
    engine = (engine_after - engine_before) / done
    return {"client_ttft_s": statistics.mean(ttfts), "engine_s": engine, "requests": float(requests)}


@contextmanager
def decode_load(base_url: str, streams: int, api_key: str | None = None) -> Iterator[None]:
    """`streams` long streamed completions decoding until the block ends (then their connections
    close, which aborts them): the engine busy, as under serving load."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    done, decoding = threading.Event(), threading.Semaphore(0)

    def one(model: str) -> None:
        body = {"model": model, "prompt": "Once upon a time", "stream": True, "ignore_eos": True}
        client = httpx.Client(base_url=base_url, timeout=600, headers=headers)
        with client, client.stream("POST", "/v1/completions", json={**body, "max_tokens": 2048}) as answer:
            for i, _ in enumerate(answer.iter_lines()):
                if i == 2:
                    decoding.release()
                if done.is_set():
                    return

    model = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    threads = [threading.Thread(target=one, args=(model,), daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            if not decoding.acquire(timeout=300):
                raise RuntimeError("the background streams did not start decoding")
        yield
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)


def _first_token(client: Any, body: dict[str, Any]) -> float:
    """Seconds from sending `body` to the first SSE event that carries a choice (read to the end)."""
    start, first = time.perf_counter(), None
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            data = line[5:].strip() if line.startswith("data:") else "[DONE]"
            if first is None and data != "[DONE]" and json.loads(data).get("choices"):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream carried no choice")
    return first


def visible_fraction(tokenizer: Any, model_vocab: int) -> float:
    """The share of ids in [0, model_vocab) with text of their own: what a dummy-weight model,
    sampling ids about uniformly, shows the client. Ids past the tokenizer's have none; a piece of a
    UTF-8 character is held back by the detokenizer (engine/detokenizer.py) until it completes."""
    known = min(len(tokenizer), model_vocab)
    texts = (tokenizer.decode([i], skip_special_tokens=True) for i in range(known))
    return sum(1 for text in texts if text and not text.endswith("\ufffd")) / model_vocab


def _busy_fixed(busy: dict[str, float], tokens: int, per_token: float) -> float:
    """The fixed part of a front measured at `tokens` prompt tokens (recorded in `busy`)."""
    busy["prompt_tokens"] = float(tokens)
    return max(0.0, busy["client_ttft_s"] - busy["engine_s"] - per_token * tokens)


def measure_front(
    tokenizer: Any,
    base_url: str | None,
    log: Callable[[str], None] = print,
    requests: int = 20,
    api_key: str | None = None,
    dummy_vocab: int | None = None,
    http_sizes: Sequence[int] = HTTP_SIZES,
    metrics_url: str | None = None,
    busy_streams: int = 0,
) -> Front:
    """The front section of a profile. Without a server: tokenization only (fixed part and slope of
    the fitted line). With one: the front's time (client TTFT - engine time) at each of `http_sizes`
    prompt tokens, a line through those: everything a longer prompt costs outside the engine (JSON,
    tokenization, copies) in its slope; with `busy_streams`, the fixed part again while that many
    streams decode (the front shares the process with a busy engine loop). `dummy_vocab`: the share
    of tokens with text."""
    points = tokenize_costs(tokenizer)
    fixed, per_token = fit_line(points)
    shown = ", ".join(f"{n} tokens {s * 1e3:.2f} ms" for n, s in points)
    log(f"tokenize: {shown} -> {fixed * 1e3:.3f} ms + {per_token * 1e6:.3f} us/token")
    http = []
    if base_url is not None:
        rng = random.Random(1)
        for size in http_sizes:
            prompt = prompt_text(tokenizer, size, rng)
            tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
            h = http_overhead(base_url, prompt, requests, api_key, metrics_url)
            http.append({"prompt_tokens": float(tokens), **h})
            log(
                f"http, {tokens} prompt tokens: client TTFT {h['client_ttft_s'] * 1e3:.2f} ms,"
                f" engine {h['engine_s'] * 1e3:.2f} ms"
            )
        fronts = [(int(h["prompt_tokens"]), h["client_ttft_s"] - h["engine_s"]) for h in http]
        fixed, slope = fit_line(fronts)
        per_token = slope if len(fronts) > 1 else per_token
        log(f"front: {fixed * 1e3:.2f} ms a request + {per_token * 1e6:.3f} us a prompt token")
    busy_fixed, busy = None, {}
    if base_url is not None and busy_streams:
        prompt = prompt_text(tokenizer, http_sizes[0], random.Random(2))
        with decode_load(base_url, busy_streams, api_key):
            busy = http_overhead(base_url, prompt, requests, api_key, metrics_url)
        busy_fixed = _busy_fixed(busy, len(tokenizer.encode(prompt, add_special_tokens=False)), per_token)
        busy["streams"] = float(busy_streams)
        log(f"front with {busy_streams} streams decoding: {busy_fixed * 1e3:.2f} ms a request")
    visible = visible_fraction(tokenizer, dummy_vocab) if dummy_vocab else 1.0
    if dummy_vocab:
        log(f"dummy weights over {dummy_vocab} ids: {visible:.3f} of the tokens have text")
    source = {"tokenize": [list(p) for p in points], "http": http, "http_busy": busy}
    return Front(fixed, per_token, source, visible, busy_fixed)

"""One streamed OpenAI request (chat or completions) -> a RequestResult; every request ends.

Timing, all from `time.perf_counter()` at the moment the request is sent:

    send ──── TTFT ────▶ 1st text chunk ─ ITL ─▶ 2nd ─ ITL ─▶ ... last ──▶ [DONE]   (= latency, E2EL)

A chunk counts when it carries generated text: the chat stream's opening chunk (role only, empty
content) is not a token, so it does not stop the TTFT clock. The output token count comes from the
`usage` chunk (`stream_options.include_usage`), or, from a server that sends none, from the number of
text chunks. Any failure (HTTP status, error event, broken stream, timeout, refused connection) becomes
the result's `error` text; nothing here raises.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.bench.dataset import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_BODY_CHARS = 500


class StreamError(Exception):
    """The server answered, but not with a complete stream."""


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    base_url: str  # without /v1
    endpoint: str  # "completions" or "chat"
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 600.0

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestResult:
    """What one request measured. Times in seconds; `ttft` is None until a token arrived."""

    input_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_len: int = 0
    usage_input_len: int | None = None  # the server's prompt_tokens (a chat template adds some)
    cached_input_len: int | None = None  # usage.prompt_tokens_details.cached_tokens: prefix-cache hits
    start: float = 0.0  # perf_counter() when sent
    cut: bool = False  # cancelled by the run's duration limit while in flight

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (output tokens - 1)."""
        if not self.success or self.ttft is None or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def normalize_base_url(url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000' (both spellings are accepted on the command line)."""
    return url.rstrip("/").removesuffix("/v1")


def payload(target: Target, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": request.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send(
    client: httpx.AsyncClient, target: Target, request: BenchRequest, result: RequestResult | None = None
) -> RequestResult:
    """Send one request and stream its answer into `result` (a new one by default); a result in every
    case, within `target.timeout`. Cancelling the call leaves in `result` what was measured so far."""
    result = result or RequestResult(request.input_len, request.output_len)
    result.start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, target, request, result), target.timeout)
        result.success = True
    except asyncio.TimeoutError:
        result.error = f"timeout: no complete answer in {target.timeout:g} s"
    except StreamError as e:
        result.error = str(e)
    except Exception as e:  # noqa: BLE001 - a request's failure is data for the report, not a crash
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    result.latency = time.perf_counter() - result.start
    return result


async def _stream(client: httpx.AsyncClient, target: Target, request: BenchRequest, r: RequestResult) -> None:
    body = payload(target, request)
    async with client.stream("POST", target.url, json=body, headers=target.headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise StreamError(f"HTTP {response.status_code}: {text[:ERROR_BODY_CHARS]}")
        chunks, done, last = 0, False, r.start
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            if _take_chunk(json.loads(data), r):
                if r.ttft is None:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last)
                chunks, last = chunks + 1, now
    if not done:
        raise StreamError("the stream ended without [DONE]")
    if r.ttft is None:
        raise StreamError("the stream carried no generated text")
    if r.output_len == 0:
        r.output_len = chunks


def _take_chunk(chunk: dict[str, Any], r: RequestResult) -> bool:
    """Record a chunk's usage; raise on an error event; True when it carries generated text."""
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise StreamError(f"error event in the stream: {message}")
    usage = chunk.get("usage")
    if usage:
        r.output_len = int(usage.get("completion_tokens") or 0)
        r.usage_input_len = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        r.cached_input_len = details.get("cached_tokens")
    for choice in chunk.get("choices") or ():
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if text:
            return True
    return False


def first_model_id(base_url: str, api_key: str | None, timeout: float = 30.0) -> str:
    """The first model id that GET /v1/models lists (the model to ask for when none is given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=timeout)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model")
    return str(models[0]["id"])

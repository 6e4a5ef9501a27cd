"""Every kind of bad input gets OpenAI's error shape with the right status, never a 422 or a 500.

The server must still be healthy and serving after all of them.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, ServerProcess

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
DROP = object()  # a field to leave out
LONG_TEXT = "hello " * 9000  # more tokens than the model's 8192 context
TOOL_F = {"type": "function", "function": {"name": "f"}}
NAMED_G = {"type": "function", "function": {"name": "g"}}
NAN_BODY = b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL.encode()


def chat(**fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return _merge(body, fields)


def comp(**fields: Any) -> dict[str, Any]:
    return _merge({"model": MODEL, "prompt": "hi", "max_tokens": 4}, fields)


def _merge(body: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    body = {**body, **fields}
    return {k: v for k, v in body.items() if v is not DROP}


# (id, path, JSON body or raw bytes, status, param)
CASES: list[tuple[str, str, Any, int, str | None]] = [
    # malformed bodies
    ("malformed-json", CHAT, b'{"model": ', 400, None),
    ("empty-body", COMP, b"", 400, None),
    ("json-array", CHAT, b"[1, 2]", 400, None),
    ("json-string", COMP, b'"hi"', 400, None),
    ("form-encoded", COMP, b"model=x&prompt=y", 400, None),
    ("nan", COMP, NAN_BODY, 400, "temperature"),
    # missing fields
    ("chat-no-messages", CHAT, chat(messages=DROP), 400, "messages"),
    ("chat-no-model", CHAT, chat(model=DROP), 400, "model"),
    ("comp-no-prompt", COMP, comp(prompt=DROP), 400, "prompt"),
    ("comp-no-model", COMP, comp(model=DROP), 400, "model"),
    # wrong types
    ("messages-string", CHAT, chat(messages="hi"), 400, "messages"),
    ("messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages"),
    ("message-no-role", CHAT, chat(messages=[{"content": "x"}]), 400, "messages"),
    ("message-content-int", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    (
        "message-image-part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages",
    ),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("max-tokens-string", COMP, comp(max_tokens="8"), 400, "max_tokens"),
    ("max-tokens-float", COMP, comp(max_tokens=8.5), 400, "max_tokens"),
    ("max-tokens-bool", COMP, comp(max_tokens=True), 400, "max_tokens"),
    ("n-string", CHAT, chat(n="2"), 400, "n"),
    ("stream-string", CHAT, chat(stream="yes"), 400, "stream"),
    ("stop-int", COMP, comp(stop=5), 400, "stop"),
    ("seed-string", COMP, comp(seed="x"), 400, "seed"),
    ("model-int", COMP, comp(model=5), 400, "model"),
    ("prompt-int", COMP, comp(prompt=5), 400, "prompt"),
    ("prompt-floats", COMP, comp(prompt=[1.5, 2.5]), 400, "prompt"),
    ("prompt-mixed", COMP, comp(prompt=["a", 1]), 400, "prompt"),
    ("chat-logprobs-int", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("comp-logprobs-bool", COMP, comp(logprobs=True), 400, "logprobs"),
    (
        "stream-options-type",
        CHAT,
        chat(stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options",
    ),
    ("stop-token-ids-strings", COMP, comp(stop_token_ids=["a"]), 400, "stop_token_ids"),
    # out-of-range values
    ("temperature-negative", CHAT, chat(temperature=-0.5), 400, "temperature"),
    ("top-p-zero", CHAT, chat(top_p=0.0), 400, "top_p"),
    ("top-p-above-one", COMP, comp(top_p=1.5), 400, "top_p"),
    ("max-tokens-zero", COMP, comp(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-3), 400, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("n-zero", CHAT, chat(n=0), 400, "n"),
    ("n-huge", COMP, comp(n=1000), 400, "n"),
    ("seed-too-wide", COMP, comp(seed=2**70), 400, "seed"),
    ("presence-penalty", CHAT, chat(presence_penalty=3.0), 400, "presence_penalty"),
    ("frequency-penalty", COMP, comp(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("top-k", COMP, comp(top_k=-2), 400, "top_k"),
    ("min-p", COMP, comp(min_p=1.5), 400, "min_p"),
    ("repetition-penalty", CHAT, chat(repetition_penalty=0.0), 400, "repetition_penalty"),
    ("min-tokens-above-max", COMP, comp(min_tokens=10, max_tokens=4), 400, "min_tokens"),
    ("min-tokens-negative", COMP, comp(min_tokens=-1), 400, "min_tokens"),
    ("stop-empty-string", COMP, comp(stop=[""]), 400, "stop"),
    ("stop-too-many", COMP, comp(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-token-negative", COMP, comp(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("stop-token-beyond-vocab", COMP, comp(stop_token_ids=[10**9], min_tokens=2), 400, "stop_token_ids"),
    ("comp-logprobs-21", COMP, comp(logprobs=21), 400, "logprobs"),
    ("comp-logprobs-negative", COMP, comp(logprobs=-1), 400, "logprobs"),
    ("chat-top-logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("chat-top-logprobs-alone", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    (
        "stream-options-without-stream",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    # prompts
    ("prompt-empty-string", COMP, comp(prompt=""), 400, "prompt"),
    ("prompt-empty-list", COMP, comp(prompt=[]), 400, "prompt"),
    ("prompt-batch-too-big", COMP, comp(prompt=["a"] * 65), 400, "prompt"),
    ("prompt-batch-with-empty", COMP, comp(prompt=[[1, 2], []]), 400, "prompt"),
    ("prompt-negative-id", COMP, comp(prompt=[-1]), 400, "prompt"),
    ("prompt-id-beyond-vocab", COMP, comp(prompt=[10**9]), 400, "prompt"),
    # context length
    ("comp-prompt-too-long", COMP, comp(prompt=LONG_TEXT, max_tokens=DROP), 400, "prompt"),
    ("chat-prompt-too-long", CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "messages"),
    ("comp-prompt-plus-max-tokens", COMP, comp(max_tokens=8192), 400, "max_tokens"),
    ("chat-prompt-plus-max-tokens", CHAT, chat(max_tokens=8190), 400, "max_tokens"),
    ("chat-prompt-plus-max-completion", CHAT, chat(max_completion_tokens=8190), 400, "max_completion_tokens"),
    # unsupported features
    ("echo-with-logprobs", COMP, comp(echo=True, logprobs=1), 400, "echo"),
    ("suffix", COMP, comp(suffix="x"), 400, "suffix"),
    ("best-of", COMP, comp(best_of=3), 400, "best_of"),
    ("logit-bias-beyond-vocab", COMP, comp(logit_bias={"999999": 5}), 400, "logit_bias"),
    ("logit-bias-not-an-id", COMP, comp(logit_bias={"a": 5}), 400, "logit_bias"),
    ("logit-bias-out-of-range", COMP, comp(logit_bias={"50": -101}), 400, "logit_bias"),
    ("tool-choice-unknown-function", CHAT, chat(tools=[TOOL_F], tool_choice=NAMED_G), 400, "tool_choice"),
    ("tool-choice-without-tools", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("tool-without-name", CHAT, chat(tools=[{"type": "function", "function": {}}]), 400, "tools"),
    ("beam-search", CHAT, chat(use_beam_search=True), 400, "use_beam_search"),
    ("response-format", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type"),
]


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.headers, timeout=120)


def assert_error_shape(r: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == error_type
    return dict(error)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(http: httpx.Client, path: str, body: Any, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    error = assert_error_shape(r, status, "invalid_request_error")
    assert error["param"] == param, error
    assert error["code"] is None


def test_huge_prompts_are_refused_before_tokenizing(http: httpx.Client) -> None:
    """2 MB of text cannot fit 8192 tokens whatever its tokens (none is longer than its vocabulary
    entry): refused from its length, without tokenizing it on the event loop first."""
    huge = "word " * 400_000
    chat_body = chat(messages=[{"role": "user", "content": huge}])
    for path, body, param in ((COMP, comp(prompt=huge), "prompt"), (COMP, comp(prompt=[huge]), "prompt"),
                              (CHAT, chat_body, "messages")):  # fmt: skip
        error = assert_error_shape(http.post(path, json=body), 400, "invalid_request_error")
        assert error["param"] == param and "characters" in error["message"], error


@pytest.mark.parametrize("path", [CHAT, COMP])
def test_unknown_model_is_404(http: httpx.Client, path: str) -> None:
    body = chat(model="gpt-4o") if path == CHAT else comp(model="gpt-4o")
    error = assert_error_shape(http.post(path, json=body), 404, "invalid_request_error")
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nothing", 404),
        ("POST", "/v1/nothing", 404),
        ("GET", CHAT, 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_unknown_route_and_method(http: httpx.Client, method: str, path: str, status: int) -> None:
    assert_error_shape(http.request(method, path), status, "invalid_request_error")


def test_streaming_request_errors_before_the_stream(http: httpx.Client) -> None:
    r = http.post(CHAT, json=chat(stream=True, temperature=-1))
    assert_error_shape(r, 400, "invalid_request_error")
    r = http.post(COMP, json=comp(stream=True, model="nope"))
    assert_error_shape(r, 404, "invalid_request_error")


def test_extra_fields_and_nulls_are_accepted(http: httpx.Client) -> None:
    nulls = {"temperature": None, "top_p": None, "n": None, "stop": None, "seed": None, "stream": None}
    r = http.post(COMP, json=comp(some_future_field={"x": 1}, user="u", **nulls))
    assert r.status_code == 200, r.text
    r = http.post(CHAT, json=chat(max_tokens=None, max_completion_tokens=2, logprobs=None, top_logprobs=None))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_server_still_healthy_after_bad_input(server: ServerProcess, http: httpx.Client) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = http.post(COMP, json=comp(max_tokens=3, temperature=0.0))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    assert re.search(r'pdserve_requests_total\{[^}]*outcome="invalid_request"', metrics)
    assert 'outcome="error"' not in metrics  # nothing above was an internal error

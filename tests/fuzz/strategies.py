"""Hypothesis strategies for the fuzz tests: what a client may send to the HTTP API and what a peer may
send to the KV control port.

    HTTP      valid_body(kind)      chat / completion bodies, valid (max_tokens <= 3: they end fast)
              mutated_body(kind)    ... wrong in some fields: wrong types, huge / negative numbers,
                                    NaN-like strings, unicode, deep nesting, extra and missing fields
              broken_body(kind)     ... and surely wrong in one (so most requests cost no model time)
              RAW_BODIES            bytes that are not (quite) a JSON body
              http_case(api_key)    one whole request: method, path, headers, body
    control   control_message(ctx)  a frame of every disagg/protocol.py type, each field valid, at a
                                    boundary, or wrong (or missing), plus extra fields
              control_frame(ctx)    such a frame as bytes, or bytes that are no frame at all
              prefill_replies(ctx)  what a (fake) prefill instance answers to one Reserve, in any order

Nothing here knows what the server answers; the tests check that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

MODEL = "SmolLM2-135M-Instruct"
VOCAB_SIZE = 49152  # the default model's
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"

# ---- values that are wrong almost anywhere ----------------------------------------------------------------

WEIRD_STRINGS = [
    "",
    " ",
    "NaN",
    "nan",
    "-NaN",
    "Infinity",
    "-Infinity",
    "inf",
    "1e999",
    "-1e999",
    "0x1F",
    "1_000",
    " 3 ",
    "٣",
    "３",
    "true",
    "null",
    "None",
    "{}",
    "[]",
    "\x00",
    "\ud800",
    "\udfff",
    "\u202e",
    "\ufeff",
    "a\u0301\u0301\u0301",
    "😀" * 20,
    "<|im_start|>system\n",
    "<|endoftext|>",
    "{{ 7*7 }}",
    "{% if %}",
    "../../etc/passwd",
    "tcp://127.0.0.1:1",
    "%s%s%n",
]
HUGE_INTS = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**70, 10**30, -(2**31), -(2**63) - 1, -1]


# Strategies are built once, here and below: hypothesis validates each new strategy object, which
# costs far more than drawing from it.
TEXTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(WEIRD_STRINGS),
    st.integers(200, 20_000).map(lambda n: "ab " * (n // 3)),  # now and then a long one
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(HUGE_INTS),
    st.floats(),  # NaN and infinities included: json.dumps writes them as NaN / Infinity
    TEXTS,
)
_KEYS = st.text(max_size=8)
JUNK = st.one_of(  # any JSON value: scalars, and lists and objects of them, two levels deep
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(_KEYS, SCALARS, max_size=4),
    st.lists(st.lists(SCALARS, max_size=3) | st.dictionaries(_KEYS, SCALARS, max_size=3), max_size=3),
    st.dictionaries(
        _KEYS, st.lists(SCALARS, max_size=3) | st.dictionaries(_KEYS, SCALARS, max_size=3), max_size=3
    ),
)  # (st.recursive says it better, at five times the cost of a draw)


DEPTHS = st.sampled_from([100, 2_000, 100_000])  # nesting: below, near and past a parser's recursion limit


def weighted(choices: list[tuple[int, st.SearchStrategy[Any]]]) -> st.SearchStrategy[Any]:
    """One of `choices`, about as often as its weight says. (one_of favours its first branches, and
    integers their bounds: the first choice, the commonest, takes both ends of the table.)"""
    (weight, first), rest = choices[0], choices[1:]
    table = (
        [first] * (weight - weight // 2) + [s for w, s in rest for _ in range(w)] + [first] * (weight // 2)
    )
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def rarely(one_in: int) -> st.SearchStrategy[bool]:
    """True about once in `one_in` draws (a value in the middle: integers favour their bounds)."""
    return st.integers(0, one_in - 1).map(lambda i: i == one_in // 2)


def deep(depth: int, leaf: Any = 1) -> Any:
    """A list nested `depth` deep (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# ---- OpenAI request bodies -----------------------------------------------------------------------------

BOUNDED = ("max_tokens", "max_completion_tokens")  # kept small or invalid: a fuzz must finish fast
token_ids = st.integers(0, VOCAB_SIZE - 1)
small_floats = st.floats(-2.0, 2.0)
COMMON_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.05, 1.0),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0.0, 1.0),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=4)),
    "n": st.integers(1, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": small_floats,
    "frequency_penalty": small_floats,
    "repetition_penalty": st.floats(0.5, 2.0),
    "logit_bias": st.just({}),
    "user": st.text(max_size=20),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(token_ids, max_size=3),
    "skip_special_tokens": st.booleans(),
    "min_tokens": st.integers(0, 1),
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 3),
}
COMPLETION_FIELDS = {**COMMON_FIELDS, "logprobs": st.integers(0, 5), "echo": st.just(False)}


BAD_COUNTS = JUNK.filter(lambda v: v is not None and not (type(v) is int and 4 <= v <= 8192))
_ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
_PARTS = st.lists(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=8)), min_size=1, max_size=2
)
_CONTENT = st.one_of(st.text(max_size=12), _PARTS)  # short: random unicode is many tokens each
MESSAGES = st.builds(
    lambda head, tail: [*head, tail],
    st.lists(st.builds(lambda r, c: {"role": r, "content": c}, _ROLES, _CONTENT), max_size=2),
    st.builds(lambda c: {"role": "user", "content": c}, _CONTENT),
)
_IDS = st.lists(token_ids, min_size=1, max_size=8)
PROMPTS = st.one_of(
    st.text(min_size=1, max_size=24),
    _IDS,
    st.text(min_size=1, max_size=16).map(lambda t: [t]),
    _IDS.map(lambda x: [x]),
)
_USER = {"role": "user", "content": "hi"}
_BROKEN_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": JUNK, "content": st.text(max_size=5)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": JUNK}),
    st.fixed_dictionaries({"content": st.text(max_size=5)}),
    st.fixed_dictionaries({"role": st.just("user")}, optional={"name": JUNK, "tool_calls": JUNK}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(JUNK, min_size=1, max_size=3)}),
    JUNK,
)
BAD_MESSAGES = st.one_of(  # wrong in one place, too many for the context, or nested deep
    st.lists(_BROKEN_MESSAGE, min_size=1, max_size=3).map(lambda m: [_USER, *m]),
    st.integers(2000, 5000).map(lambda n: [{"role": "user", "content": ""}] * n),
    st.sampled_from([10, 500]).map(lambda d: [{"role": "user", "content": deep(d, "x")}]),
    JUNK,
)
BAD_PROMPTS = st.one_of(
    st.lists(st.integers(VOCAB_SIZE, 2**70) | st.integers(-(2**70), -1), min_size=1, max_size=3),
    st.lists(st.floats(), min_size=1, max_size=3),
    st.lists(st.text(max_size=5), min_size=2, max_size=3),  # a batch
    st.sampled_from([[], [[]], [[1], [2]], [""], [[VOCAB_SIZE]], "ab " * 12_000]),
    st.sampled_from([1, 300, 5_000]).map(deep),
    JUNK,
)
BAD_MODELS = st.sampled_from([MODEL.lower(), MODEL + " ", "gpt-4o", "", "../" + MODEL, MODEL + "\x00"])
_SPECIAL = {"messages": BAD_MESSAGES, "prompt": BAD_PROMPTS, "model": BAD_MODELS}
# values that no field of that name takes: a type it never has, or a number outside its range
_OBJECT = st.dictionaries(st.text(max_size=5), SCALARS, min_size=1, max_size=3)
_NOT_OBJECT = st.one_of(st.lists(SCALARS, max_size=3), TEXTS, st.integers(), st.booleans())
_NOT_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
_OUT_OF_RANGE: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.sampled_from([-1.0, -1e-9, -1e300]) | _NOT_FINITE,
    "top_p": st.sampled_from([0.0, -0.5, 1.0000001, 2.0, 1e300]) | _NOT_FINITE,
    "top_k": st.sampled_from([-2, -(2**63), -(2**70)]),
    "min_p": st.sampled_from([-0.1, 1.5, 1e300]) | _NOT_FINITE,
    "seed": st.sampled_from([2**63, -(2**63) - 1, 2**70, -(2**70)]),
    "n": st.sampled_from([0, -1, 17, 2**40, 2**70]),
    "presence_penalty": st.sampled_from([2.5, -3.0, 1e300]) | _NOT_FINITE,
    "frequency_penalty": st.sampled_from([2.5, -3.0, -1e300]) | _NOT_FINITE,
    "repetition_penalty": st.sampled_from([0.0, -1.0]) | _NOT_FINITE,
    "min_tokens": st.sampled_from([-1, 10**9, 2**70]),
    "top_logprobs": st.sampled_from([-1, 21, 10**9]),
    "logprobs": st.sampled_from([-1, 21, 10**9, 2**70]),
    "stop_token_ids": st.sampled_from([[-1], [VOCAB_SIZE], [2**70], [1.5]]),
    "stop": st.sampled_from([[""], [1], ["a"] * 17, 5]),
    "messages": BAD_MESSAGES.filter(lambda m: not isinstance(m, str)),  # (a str is no message list)
    "prompt": st.sampled_from([[], [[]], [[1], [2]], [[VOCAB_SIZE]], [-1], "ab " * 12_000]),
    "model": BAD_MODELS,
    "echo": st.just(True),
}
_OBJECT_FIELDS = ("logit_bias", "stream_options")
_EXTRA = "(extra)"
_ACTIONS = st.sampled_from(["junk", "drop", "special"])
_MUTATIONS = st.integers(1, 3)
_FIELD_NAMES = {
    "chat": sorted({"model", "messages", *CHAT_FIELDS}),
    "completion": sorted({"model", "prompt", *COMPLETION_FIELDS}),
}
_MUTABLE = {kind: st.sampled_from([*names, _EXTRA]) for kind, names in _FIELD_NAMES.items()}
_BREAKABLE = {kind: st.sampled_from(names) for kind, names in _FIELD_NAMES.items()}
_OPTIONAL_NAMES = {
    kind: st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)
    for kind, fields in (("chat", CHAT_FIELDS), ("completion", COMPLETION_FIELDS))
}


@st.composite
def valid_body(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A valid chat ("chat") or completion ("completion") body; max_tokens <= 3, so it ends fast."""
    optional = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    body: dict[str, Any] = {"model": MODEL, "max_tokens": draw(st.integers(1, 3))}
    body["messages" if kind == "chat" else "prompt"] = draw(MESSAGES if kind == "chat" else PROMPTS)
    for name in draw(_OPTIONAL_NAMES[kind]):
        body[name] = draw(optional[name])
    if "stream_options" in body:  # only with a stream
        body["stream"] = True
    if "top_logprobs" in body:  # only with logprobs
        body["logprobs"] = True
    return body


@st.composite
def mutated_body(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A valid body mutated in one to three places (wrong values, fields gone, extra fields); some
    of these are still valid."""
    body = draw(valid_body(kind))
    for _ in range(draw(_MUTATIONS)):
        mutate(draw, body, draw(_MUTABLE[kind]))
    return body


@st.composite
def broken_body(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A mutated body with one field surely wrong: a type it never has, or a value out of its range."""
    body = draw(mutated_body(kind))
    name = draw(_BREAKABLE[kind])
    if name in BOUNDED:
        body[name] = draw(BAD_COUNTS.filter(lambda v: not (type(v) is int and 1 <= v <= 3)))
    elif name in _OUT_OF_RANGE and draw(st.booleans()):
        body[name] = draw(_OUT_OF_RANGE[name])
    else:
        body[name] = draw(_NOT_OBJECT if name in _OBJECT_FIELDS else _OBJECT)
    return body


def mutate(draw: st.DrawFn, body: dict[str, Any], name: str) -> None:
    """Break field `name` of `body` (in place): a wrong value, gone, or an extra field beside it."""
    action = draw(_ACTIONS)
    if name == _EXTRA:
        body[draw(st.text(min_size=1, max_size=12))] = draw(JUNK)
    elif name in BOUNDED:
        body[name] = draw(BAD_COUNTS)  # dropping it would ask for the whole context
    elif action == "drop":
        body.pop(name, None)
    elif action == "special" and name in _SPECIAL:
        body[name] = draw(_SPECIAL[name])
    else:
        body[name] = draw(JUNK)


_HEAD = '{"model": "' + MODEL + '", "max_tokens": 2, '
_VALID_JSON = valid_body("completion").map(lambda b: json.dumps(b).encode())
_TEMPLATES = [
    _HEAD + '"prompt": "hi", "temperature": NaN}',
    _HEAD + '"prompt": "hi", "top_p": Infinity}',
    _HEAD + '"prompt": "hi", "temperature": 1e999}',
    _HEAD + '"prompt": "\\ud800\\udfff\\ud800"}',
    _HEAD + '"prompt": "hi", "prompt": [1, 2]}',
    _HEAD + '"prompt": "hi"} trailing',
    _HEAD + '"prompt": "hi",}',
    _HEAD + "'prompt': 'hi'}",
]
RAW_BODIES = st.one_of(  # not quite a JSON request
    st.binary(max_size=300),
    st.tuples(_VALID_JSON, st.integers(0, 10_000)).map(
        lambda t: t[0][: t[1] % max(len(t[0]), 1)]
    ),  # cut short
    JUNK.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(_TEMPLATES).map(str.encode),
    st.integers(20, 6000).map(lambda n: (_HEAD + '"prompt": "hi", "seed": ' + "9" * n + "}").encode()),
    st.sampled_from([100, 2_000, 100_000]).map(
        lambda d: (_HEAD + '"prompt": ' + "[" * d + "]" * d + "}").encode()
    ),
    st.tuples(_VALID_JSON, st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"])).map(
        lambda t: t[0].decode().encode(t[1], errors="replace")
    ),
    st.binary(min_size=1, max_size=40).map(lambda b: _HEAD.encode() + b'"prompt": "' + b + b'"}'),
)


# ---- whole HTTP requests -------------------------------------------------------------------------------

ROUTES = [
    CHAT, COMP, "/v1/models", "/health", "/metrics", "/pd/info", "/debug/kv", "/docs", "/openapi.json",
    "/redoc", "/v1/embeddings", "/v1/responses", "/", "/v1", "/v1/", CHAT + "/", COMP + "/",
    "//v1/completions", "/v1/models/" + MODEL, "/V1/COMPLETIONS", COMP + "?stream=true", "/v1/%2e%2e/health",
    CHAT + "%00", "/router/instances", "/v1/models/../../health",
]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "application/json; charset=utf-16", "*/*", "", "application/json;;"]  # fmt: skip
header_names = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20
)
header_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)  # no edge spaces


@dataclass(frozen=True)
class HttpCase:
    """One request to send, and what it is for reports."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    content: bytes | None
    what: str  # "chat", "completion", "raw", "route"

    def describe(self, limit: int = 300) -> str:
        body = (self.content or b"")[:limit]
        sizes = {k: len(v) for k, v in self.headers if len(v) > 100}
        return f"{self.method} {self.path[:100]} ({self.what}) headers-over-100B={sizes} body={body!r}"


_BAD_AUTH = st.sampled_from(
    ["Bearer", "Bearer wrong", "Basic {key}", "bearer  {key}", "Bearer " + "k" * 5000]
)
_CONTENT_TYPE = st.sampled_from(CONTENT_TYPES)
_EXTRA_HEADERS = st.lists(st.tuples(header_names.map(lambda n: "X-" + n), header_values), max_size=3)
_HUGE = st.sampled_from([8_000, 70_000, 300_000])
_AUTH = weighted([(16, st.just("right")), (3, st.just("wrong")), (1, st.just("none"))])
_RARELY = {n: rarely(n) for n in (5, 10, 20, 30)}


@st.composite
def headers(draw: st.DrawFn, api_key: str, json_body: bool) -> tuple[tuple[str, str], ...]:
    """Mostly the right key and content type; sometimes none, a wrong one, extra or huge headers."""
    out: list[tuple[str, str]] = []
    auth = draw(_AUTH)
    if auth == "right":
        out.append(("Authorization", f"Bearer {api_key}"))
    elif auth == "wrong":
        out.append(("Authorization", draw(_BAD_AUTH).format(key=api_key)))
    if json_body and not draw(_RARELY[5]):
        out.append(("Content-Type", "application/json"))
    elif draw(st.booleans()):
        out.append(("Content-Type", draw(_CONTENT_TYPE)))
    out += draw(_EXTRA_HEADERS)
    if draw(_RARELY[30]):
        out.append(("X-Huge", "h" * draw(_HUGE)))
    return tuple(out)


_SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@", max_size=12)
PATHS = st.one_of(
    st.sampled_from(ROUTES),
    st.lists(_SEGMENT, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)),
    st.integers(100, 6000).map(lambda n: "/v1/" + "a" * n),
)


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity as Python writes them, the rest as \\u escapes


def _utf8_dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")  # lone surrogates too


def http_case(api_key: str) -> st.SearchStrategy[HttpCase]:
    """A chat or completion body (valid, mutated, surely wrong, or raw bytes), or any method on any
    path. Valid bodies are few: each one runs the model, which is slow on a CPU."""
    json_headers = headers(api_key, True)
    dumps = st.sampled_from([_dumps, _utf8_dumps])

    def posts(path: str, what: str, body: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[HttpCase]:
        return st.builds(lambda h, b, d: HttpCase("POST", path, h, d(b), what), json_headers, body, dumps)

    def both(what: str, body: Any) -> st.SearchStrategy[HttpCase]:
        return posts(CHAT, f"chat {what}", body("chat")) | posts(
            COMP, f"completion {what}", body("completion")
        )

    raw = st.builds(
        lambda p, h, c: HttpCase("POST", p, h, c, "raw"),
        st.sampled_from([CHAT, COMP]),
        json_headers,
        RAW_BODIES,
    )
    route = st.builds(
        lambda m, p, h, c: HttpCase(m, p, h, c, "route"),
        st.sampled_from(METHODS),
        PATHS,
        headers(api_key, False),
        st.none() | st.binary(max_size=50),
    )
    mutated, valid = both("mutated", mutated_body), both("valid", valid_body)
    return weighted([(24, both("broken", broken_body)), (7, raw), (7, route), (1, mutated), (1, valid)])


# ---- KV control messages (pdserve/disagg/protocol.py) ---------------------------------------------------


@dataclass
class ControlContext:
    """What a fuzzed frame may name: our own address (replies come back to it), the model and KV
    layout the instances have, and a few transfer ids (so Aborts and Heartbeats meet Reserves)."""

    sender: str
    model: str = MODEL
    layout: dict[str, Any] = field(default_factory=dict)
    transfer_ids: tuple[str, ...] = ("t0", "t1", "t2", "t3")
    block_ids: tuple[int, ...] = ()  # the blocks a real transfer reserved (decode side)
    block_bytes: int = 0


UNREACHABLE = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:65535", "tcp://[::1]:1"]
NOT_ADDRESSES = ["", "garbage", "tcp://", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", "tcp://[::1",
                 "udp://127.0.0.1:5", "tcp://127.0.0.1:-1", "tcp://127.0.0.1:5 ", "tcp://\x00:5"]  # fmt: skip
SAMPLING_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.05, 1.0),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**63 - 1),
    "max_tokens": st.integers(1, 8),
    "logprobs": st.integers(0, 5),
    "stop_token_ids": st.lists(token_ids, max_size=2),
    "n": st.integers(1, 2),
}
BAD_SAMPLING = [
    {"seed": "abc"}, {"seed": 2**70}, {"seed": -(2**70)}, {"seed": 1.5}, {"temperature": "hot"},
    {"temperature": float("nan")}, {"top_p": float("inf")}, {"n": 0}, {"n": 2**40}, {"logprobs": 10**6},
    {"max_tokens": -1}, {"stop": 5}, {"stop": [""]}, {"stop_token_ids": [VOCAB_SIZE]},
    {"stop_token_ids": [2**70]}, {"top_k": 2**70}, {"unknown_field": 1}, {"min_tokens": 10**9},
    {"repetition_penalty": 0}, {"logprobs": "5"}, {"ignore_eos": "yes"},
]  # fmt: skip


def pick(
    valid: st.SearchStrategy[Any], boundary: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[Any]:
    """A field's value: usually valid, sometimes at a boundary, sometimes of any type at all."""
    if boundary is None:
        return weighted([(8, valid), (2, JUNK)])
    return weighted([(6, valid), (2, JUNK), (2, boundary)])


BAD_BLOCKS = st.one_of(
    st.just([]),
    st.lists(st.sampled_from([-1, 256, 10**6, 2**63]), min_size=1, max_size=3),
    st.just([0] * 64),
    st.lists(st.floats(), min_size=1, max_size=2),
)
BAD_TOKENS = st.one_of(
    st.just([]),
    st.lists(st.sampled_from([VOCAB_SIZE, -1, 2**63, 1.5, True]), min_size=1, max_size=3),
    st.lists(token_ids, min_size=100, max_size=150),  # valid, only long
)
BAD_TOKEN = st.sampled_from([VOCAB_SIZE, 10**9, -1, 2**63])
ODD_TIMEOUTS = st.sampled_from([-1.0, 1e-9, 1e308, float("nan"), float("inf")])


def message_fields(ctx: ControlContext) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    """For each message type, a strategy per field (protocol.py's dataclasses)."""
    tid = pick(st.sampled_from(ctx.transfer_ids), st.text(max_size=30))
    tids = pick(st.lists(st.sampled_from(ctx.transfer_ids), max_size=4), st.lists(JUNK, max_size=3))
    blocks = pick(st.lists(st.integers(0, 255), min_size=1, max_size=4), BAD_BLOCKS)
    nbytes = (
        st.integers(0, 4).map(lambda n: n * ctx.block_bytes) if ctx.block_bytes else st.integers(0, 10**6)
    )
    return {
        "Handshake": {
            "model": pick(st.just(ctx.model), TEXTS),
            "layout": pick(st.just(ctx.layout), layouts(ctx)),
            "kv_offer": pick(kv_offers(), JUNK),
        },
        "HandshakeAck": {"ok": pick(st.booleans()), "reason": pick(TEXTS), "kv_path": pick(kv_paths(), JUNK)},
        "Reserve": {
            "transfer_id": tid,
            "prompt_token_ids": pick(st.lists(token_ids, min_size=1, max_size=12), BAD_TOKENS),
            "params": pick(
                st.fixed_dictionaries({}, optional=SAMPLING_FIELDS), st.sampled_from(BAD_SAMPLING)
            ),
            "block_ids": blocks,
            "timeout": pick(st.floats(0.0, 60.0), ODD_TIMEOUTS),
        },
        "KVData": {
            "transfer_id": tid,
            "block_ids": blocks,
            "nbytes": pick(nbytes, st.sampled_from(HUGE_INTS)),
            "written": pick(st.booleans()),
            "link": pick(st.just(""), TEXTS),
        },
        "Done": {
            "transfer_id": tid,
            "token_id": pick(token_ids, BAD_TOKEN),
            "logprob": pick(st.none() | logprobs(), JUNK),
            "num_cached_tokens": pick(st.integers(0, 16)),
        },
        "Failed": {
            "transfer_id": tid,
            "reason": pick(TEXTS),
            "refused": pick(st.sampled_from(["", "invalid"])),
        },
        "Abort": {"transfer_id": tid},
        "Heartbeat": {"transfer_ids": tids},
        "Pong": {"unknown_transfer_ids": tids},
    }


def layouts(ctx: ControlContext) -> st.SearchStrategy[Any]:
    """The instance's KV layout with one entry changed, dropped, or of the wrong type."""
    if not ctx.layout:
        return st.dictionaries(st.text(max_size=10), JUNK, max_size=5)
    keys = sorted(ctx.layout)
    changed = st.tuples(st.sampled_from(keys), JUNK).map(lambda kv: {**ctx.layout, kv[0]: kv[1]})
    dropped = st.sampled_from(keys).map(lambda k: {n: v for n, v in ctx.layout.items() if n != k})
    return st.one_of(changed, dropped)


def kv_offers() -> st.SearchStrategy[Any]:
    ident = st.fixed_dictionaries({}, optional={"boot": TEXTS, "pid": JUNK, "start": JUNK, "pidns": JUNK})
    kinds = st.dictionaries(st.sampled_from(["tcp", "nccl", "cuda_ipc", "carrier-pigeon"]), JUNK, max_size=3)
    return st.one_of(st.just({}), st.fixed_dictionaries({"kinds": kinds}, optional={"id": ident}))


def kv_paths() -> st.SearchStrategy[Any]:
    kind = st.sampled_from(["tcp", "bytes", "nccl", "cuda_ipc", ""]) | JUNK
    return st.one_of(st.just({}), st.fixed_dictionaries({"kind": kind}, optional={"id": JUNK}))


def logprobs() -> st.SearchStrategy[Any]:
    top = st.lists(st.tuples(pick(token_ids), pick(st.floats(-20.0, 0.0))).map(list), max_size=3)
    return st.fixed_dictionaries(
        {"token_id": pick(token_ids), "logprob": pick(st.floats(-20.0, 0.0)), "top": pick(top)}
    )


def senders(ctx: ControlContext) -> st.SearchStrategy[Any]:
    """Mostly our own address (so replies come back), else one nobody listens on, or no address."""
    others = [(1, st.sampled_from(UNREACHABLE)), (1, st.sampled_from(NOT_ADDRESSES)), (1, JUNK)]
    return weighted([(12, st.just(ctx.sender)), *others])


TYPE_WEIGHTS = {"Reserve": 4, "Done": 2, "KVData": 2, "Handshake": 2}  # the ones that reach an engine
_ODD_TYPES = st.sampled_from(["Message", "reserve", "RESERVE", "", "__class__"]) | JUNK


def control_message(ctx: ControlContext, types: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    """One message as a JSON object: a `type`, its fields (some wrong or missing), maybe extra ones."""
    table = message_fields(ctx)
    names = weighted([(TYPE_WEIGHTS.get(name, 1), st.just(name)) for name in types or sorted(table)])
    sender = senders(ctx)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        name = draw(names)
        msg: dict[str, Any] = {"type": name, "sender": draw(sender)}
        for key, strategy in table[name].items():
            if not draw(_RARELY[20]):  # now and then a field is missing
                msg[key] = draw(strategy)
        if draw(_RARELY[10]):
            msg[draw(st.text(max_size=10))] = draw(JUNK)
        if draw(_RARELY[30]):
            msg["type"] = draw(_ODD_TYPES)
        return msg

    return build()


def encode(msg: Any) -> bytes:
    return json.dumps(msg).encode("utf-8", "surrogatepass")


NESTED_FRAME = b'{"type": "Heartbeat", "sender": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
_NOT_MESSAGES = weighted([
    (2, st.binary(max_size=200)),
    (2, JUNK.map(encode)),
    (1, DEPTHS.map(lambda d: b'{"type": "Heartbeat", "sender": ' + b"[" * d + b"]" * d + b"}")),
    (1, st.sampled_from([
        b'{"type": "Reserve", "sender": "\\ud800", "transfer_id": "\\udfff"}',
        b'{"type": "Done", "sender": "x", "transfer_id": "t0", "token_id": NaN}',
        b'{"type": "Abort", "sender": "x", "transfer_id": "t0", "transfer_id": 5}',
    ])),
])  # fmt: skip


def control_frame(ctx: ControlContext) -> st.SearchStrategy[bytes]:
    """A frame for the control port: mostly a message as above (whole, or cut short), else bytes
    that are no message at all."""
    message = control_message(ctx).map(encode)
    cut = st.tuples(message, st.integers(0, 10_000)).map(lambda t: t[0][: t[1] % max(len(t[0]), 1)])
    return weighted([(8, message), (1, cut), (1, _NOT_MESSAGES)])


@dataclass(frozen=True)
class Reply:
    """One thing a fake prefill sends a decode instance: a frame on the control channel, or a KVData
    header and its bytes on the data connection."""

    frame: dict[str, Any] | bytes
    payload: bytes | None = None

    def __repr__(self) -> str:
        size = "" if self.payload is None else f" + {len(self.payload)} bytes"
        return f"{str(self.frame)[:240]}{size}"


def prefill_replies(ctx: ControlContext) -> st.SearchStrategy[list[Reply]]:
    """What a (fake) prefill sends for the one transfer in `ctx` (transfer_ids[0], block_ids): the
    right KV bytes or wrong ones, a first token in range or not, lies about direct writes, failures,
    pongs, acks; in any order, some repeated."""
    real, right, block = ctx.transfer_ids[0], len(ctx.block_ids) * ctx.block_bytes, ctx.block_bytes

    def kv_data(nbytes: int, written: bool) -> Reply:
        fields = {"transfer_id": real, "block_ids": list(ctx.block_ids), "nbytes": nbytes, "written": written}
        return Reply({"type": "KVData", "sender": ctx.sender, **fields}, b"\x00" * nbytes)

    def done(token: Any) -> Reply:
        return Reply({"type": "Done", "sender": ctx.sender, "transfer_id": real, "token_id": token})

    sizes = st.sampled_from([right, right, right, 0, max(right - block, 0), right + block])
    kv = st.builds(kv_data, sizes, st.booleans())
    first = st.builds(done, pick(token_ids, st.sampled_from([VOCAB_SIZE, 10**9, -1])))
    fuzzed = control_message(ctx, ("HandshakeAck", "KVData", "Done", "Failed", "Pong")).map(Reply)
    frames = control_frame(ctx).map(Reply)
    return st.lists(weighted([(2, kv), (2, first), (2, fuzzed), (1, frames)]), min_size=1, max_size=6)

"""What each field of a control message (protocol.py) may hold when it comes from a peer: exact types
(a bool is not an int, a float is not an int), ranges, sizes. protocol.decode checks a message against
its schema before it exists, so every handler sees only well-typed messages.

    sender          a tcp://host:port address (replies go to it)
    transfer ids    1 to 64 characters of [A-Za-z0-9_.-] (a decode instance makes them: uuid4 hex)
    token, block    ints in [0, 2**31); lists of them bounded
    nbytes, counts  ints >= 0;  timeouts finite and >= 0;  text and objects bounded
    trace_context   "" or a W3C traceparent (lower-case hex), nothing else
    num_output_tokens  0 <= N < len(prompt_token_ids): at least one prompt token is a prompt's
    params.structured  null or {"kind": str, "spec": str of at most MAX_SPEC characters}

Also the counts of dropped peer messages: MALFORMED (the one piece of process state here, because
`decode` runs inside the transports, which keep no counters) and DropCounts for a connector's own.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

MAX_ID = 2**31 - 1  # token and block ids
MAX_COUNT = 2**62  # byte and token counts
MAX_TOKENS = 1 << 20  # prompt tokens in one Reserve
MAX_BLOCKS = 1 << 20  # block ids in one message
MAX_TRANSFER_IDS = 1 << 16  # in one Heartbeat or Pong
MAX_TOP = 64  # top alternatives of a first token's logprob
MAX_TEXT = 1 << 16  # reasons, model names
MAX_KEYS = 64  # keys of a JSON object field (params, layout, offers)
MAX_SPEC = 1 << 18  # a structured output's schema or grammar (structured/spec.py MAX_SPEC_CHARS)
TRANSFER_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]{1,253}):([0-9]{1,5})")

Check = tuple[Callable[[Any], bool], str]  # (does the value fit, what it must be)


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def integer(lo: int = 0, hi: int = MAX_COUNT) -> Check:
    return (lambda v: _is_int(v, lo, hi)), f"an integer in [{lo}, {hi}]"


def ids(max_len: int, non_empty: bool = False) -> Check:
    def ok(v: Any) -> bool:
        if type(v) is not list or len(v) > max_len or (non_empty and not v):
            return False
        return all(_is_int(x, 0, MAX_ID) for x in v)

    return ok, f"a list of at most {max_len} integers in [0, {MAX_ID}]" + (", not empty" if non_empty else "")


def text(max_chars: int = MAX_TEXT) -> Check:
    return (lambda v: type(v) is str and len(v) <= max_chars), f"a string of at most {max_chars} characters"


def obj(max_keys: int = MAX_KEYS) -> Check:
    def ok(v: Any) -> bool:
        return type(v) is dict and len(v) <= max_keys and all(type(k) is str for k in v)

    return ok, f"a JSON object of at most {max_keys} keys"


def _address(v: Any) -> bool:
    m = ADDRESS.fullmatch(v) if type(v) is str else None
    return m is not None and 0 < int(m.group(2)) < 65536


def _transfer_id(v: Any) -> bool:
    return type(v) is str and TRANSFER_ID.fullmatch(v) is not None


def _transfer_ids(v: Any) -> bool:
    return type(v) is list and len(v) <= MAX_TRANSFER_IDS and all(_transfer_id(t) for t in v)


def _seconds(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


def _trace_context(v: Any) -> bool:
    return type(v) is str and (v == "" or TRACEPARENT.fullmatch(v) is not None)


def _logprob_value(v: Any) -> bool:
    return type(v) is float and not math.isnan(v) and v != math.inf


def _top_entry(v: Any) -> bool:
    return type(v) is list and len(v) == 2 and _is_int(v[0], 0, MAX_ID) and _logprob_value(v[1])


def _logprob(v: Any) -> bool:
    """None, or FirstToken.to_wire's shape: {"token_id", "logprob", "top": [[id, logprob], ...]}."""
    if v is None:
        return True
    if type(v) is not dict or set(v) - {"token_id", "logprob", "top"}:
        return False
    top = v.get("top", [])
    ok_top = type(top) is list and len(top) <= MAX_TOP and all(_top_entry(t) for t in top)
    return _is_int(v.get("token_id"), 0, MAX_ID) and _logprob_value(v.get("logprob")) and ok_top


def _params(v: Any) -> bool:
    """Reserve's SamplingParams as a JSON object; its `structured` null or {"kind": str, "spec": str}
    within the sizes the HTTP edge allows (SamplingParams checks the values themselves)."""
    if not obj()[0](v):
        return False
    spec = v.get("structured")
    if spec is None:
        return True
    if type(spec) is not dict or set(spec) != {"kind", "spec"}:
        return False
    return type(spec["kind"]) is str and len(spec["kind"]) <= 32 and text(MAX_SPEC)[0](spec["spec"])


SENDER: Check = (_address, "a tcp://host:port address")
TRANSFER: Check = (_transfer_id, "1 to 64 characters of [A-Za-z0-9_.-]")
BOOL: Check = (lambda v: type(v) is bool, "true or false")

SCHEMAS: dict[str, dict[str, Check]] = {
    "Handshake": {"model": text(1024), "layout": obj(), "kv_offer": obj()},
    "HandshakeAck": {"ok": BOOL, "reason": text(), "kv_path": obj()},
    "Reserve": {
        "transfer_id": TRANSFER,
        "prompt_token_ids": ids(MAX_TOKENS, non_empty=True),
        "params": (_params, 'a JSON object of at most 64 keys; "structured": null or {"kind", "spec"}'),
        "block_ids": ids(MAX_BLOCKS, non_empty=True),
        "timeout": (_seconds, "a finite number of seconds >= 0"),
        "cached_blocks": integer(0, MAX_BLOCKS),
        "trace_context": (_trace_context, "empty or a W3C traceparent"),
        "num_output_tokens": integer(0, MAX_TOKENS - 1),
    },
    "KVData": {
        "transfer_id": TRANSFER,
        "block_ids": ids(MAX_BLOCKS, non_empty=True),
        "nbytes": integer(),
        "written": BOOL,
        "link": text(128),
    },
    "Done": {
        "transfer_id": TRANSFER,
        "token_id": integer(0, MAX_ID),
        "logprob": (_logprob, 'null or {"token_id": int, "logprob": float, "top": [[int, float], ...]}'),
        "num_cached_tokens": integer(0, MAX_TOKENS),
    },
    "Failed": {"transfer_id": TRANSFER, "reason": text(), "refused": text(64)},
    "Abort": {"transfer_id": TRANSFER},
    "Heartbeat": {"transfer_ids": (_transfer_ids, "a list of transfer ids")},
    "Pong": {"unknown_transfer_ids": (_transfer_ids, "a list of transfer ids")},
}


def check_fields(message_type: str, values: dict[str, Any]) -> None:
    """ValueError naming the first field of `values` that its schema does not allow."""
    if not SENDER[0](values.get("sender")):
        raise ValueError(f"{message_type}.sender must be {SENDER[1]}")
    for name, (ok, what) in SCHEMAS[message_type].items():
        if name in values and not ok(values[name]):
            raise ValueError(f"{message_type}.{name} must be {what}")
    outputs = values.get("num_output_tokens", 0) if message_type == "Reserve" else 0
    if outputs and outputs >= len(values.get("prompt_token_ids", ())):  # a prompt token must remain
        raise ValueError("Reserve.num_output_tokens must be less than the number of prompt_token_ids")


class DropCounts:
    """Peer messages dropped, by reason; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str = "malformed") -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


MALFORMED = DropCounts()  # messages no transport could decode, in this process

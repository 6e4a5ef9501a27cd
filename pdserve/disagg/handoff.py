"""The typed hand-off between instances: what each side is asked for and what a transfer reports.

    entry ── FromPrefill(prefill_kv_addr, prefill_url) ──▶ decode   (HTTP: kv_transfer_params)
    decode ── Reserve ──▶ prefill: the prefill's request gets ToDecode(transfer_id, decode_addr, blocks,
                                   cached_blocks: the prompt's leading blocks decode has, none sent)
    prefill ── Done ──▶ decode: FirstToken(token_id, logprob, top) and the prompt's cached tokens

A request holds one of the first two (or none: it is local) and never changes it; per-transfer state
(which transfer a decode request waits on) lives in the connector's own records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FromPrefill:
    """Decode side: this request's prompt KV comes from the prefill instance at `prefill_kv_addr`."""

    prefill_kv_addr: str
    prefill_url: str | None = None
    trace_context: str = ""  # the W3C traceparent the Reserve carries on (observability/tracing.py)


@dataclass(frozen=True)
class ToDecode:
    """Prefill side: this request's prompt KV goes into `block_ids` of the decode instance
    `decode_addr`, as transfer `transfer_id`; the decode instance answers the client. It caches the
    prompt's first `cached_blocks` blocks already: `block_ids` are for the blocks after them."""

    transfer_id: str
    decode_addr: str
    block_ids: tuple[int, ...]
    cached_blocks: int = 0
    trace_context: str = ""  # the Reserve's: this instance's span is a child of the decode's
    reserved_at: float = 0.0  # time.monotonic() when the Reserve came


HandOff = FromPrefill | ToDecode


@dataclass(frozen=True)
class FirstToken:
    """The token the prefill instance sampled after the prompt, with its log-probability and top
    alternatives when the request asked for them (`logprob` None: it did not)."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()

    def to_wire(self) -> dict[str, Any] | None:
        """protocol.Done.logprob: the engine's Logprob fields, or None."""
        if self.logprob is None:
            return None
        return {"token_id": self.token_id, "logprob": self.logprob, "top": [list(t) for t in self.top]}

    @classmethod
    def from_wire(cls, token_id: int, logprob: dict[str, Any] | None) -> FirstToken:
        if not logprob:
            return cls(token_id)
        top = tuple((int(t), float(v)) for t, v in logprob.get("top", []))
        return cls(token_id, float(logprob["logprob"]), top)


@dataclass(frozen=True)
class PromptKV:
    """Prefill side: a request whose prompt KV is computed in local `block_ids`, bound for `target`."""

    request_id: str
    target: ToDecode
    block_ids: tuple[int, ...]  # the local blocks of the prompt, one per destination block

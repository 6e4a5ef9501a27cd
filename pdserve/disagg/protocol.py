"""The control messages between a prefill and a decode instance, and their wire format.

    decode                                   prefill
      | Handshake(layout, model, kv_offer) ---> |   checked once per peer; a mismatch is refused
      | <--- HandshakeAck(ok, reason, kv_path)  |   the prefill picks how KV travels to this peer
      | Reserve(T, prompt, params, blocks) ---> |   decode has reserved `blocks` for T's prompt, after
      |                                         |   the `cached_blocks` it has already (prefix reuse);
      |                                         |   a resumed request's outputs end the "prompt"
      |                                         |   (`num_output_tokens`): the token sampled is theirs
      | <-------- KVData(T, blocks) + raw bytes |   written straight into the reserved blocks
      | <-------------------- Done(T, token)    |   the first token; prefill frees its blocks
      | Abort(T) / Heartbeat  ----------------> |
      | <----------------- Failed(T) / Pong     |

Each message is one small JSON frame (a `type` field plus the dataclass fields). How KVData's bytes
travel is the transport's business (transport/): raw bytes after the frame (tcp), over a per-pair NCCL
link announced by `KVData.link` (nccl), or not at all: `KVData.written` says the sender already wrote
them into the reserved blocks (cuda_ipc), so that message is the proof the write is complete. Every
message names its sender's address so replies need no socket identity.

`decode` checks every field of what a peer sent (types, ranges, sizes: disagg/schemas.py) before a
message exists; what depends on state (the transfer it names, the blocks reserved, the vocabulary) is
checked where that state is (receiving.py, sending.py, the engine).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pdserve.disagg.schemas import MALFORMED, check_fields


@dataclass
class Message:
    sender: str  # the sender's KV/control address, e.g. tcp://127.0.0.1:5601


@dataclass
class Handshake(Message):
    model: str
    layout: dict[str, Any]
    kv_offer: dict[str, Any] = field(default_factory=dict)  # the KV paths this decode instance accepts


@dataclass
class HandshakeAck(Message):
    ok: bool
    reason: str = ""
    kv_path: dict[str, Any] = field(default_factory=dict)  # the path the prefill chose ({"kind": ...})


@dataclass
class Reserve(Message):
    transfer_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    block_ids: list[int]
    timeout: float = 0.0  # seconds the decode side waits; a direct write never starts later than that
    cached_blocks: int = 0  # the prompt's leading blocks decode caches: `block_ids` are for those after
    trace_context: str = ""  # W3C traceparent of the decode side's span ("": none)
    num_output_tokens: int = 0  # the last N of prompt_token_ids are outputs already (a resumed request)


@dataclass
class KVData(Message):
    transfer_id: str
    block_ids: list[int]  # destination blocks; the payload holds all layers of them
    nbytes: int
    written: bool = False  # the sender wrote the bytes into the blocks itself (complete); none follow
    link: str = ""  # the bytes follow over this NCCL link instead of the data socket


@dataclass
class Done(Message):
    transfer_id: str
    token_id: int
    logprob: dict[str, Any] | None = None
    num_cached_tokens: int = 0


@dataclass
class Failed(Message):
    transfer_id: str
    reason: str
    refused: str = ""  # "invalid": the prefill found the request itself wrong (HTTP 400, no retry)


@dataclass
class Abort(Message):
    transfer_id: str


@dataclass
class Heartbeat(Message):
    transfer_ids: list[str] = field(default_factory=list)


@dataclass
class Pong(Message):
    unknown_transfer_ids: list[str] = field(default_factory=list)  # the peer has never heard of these


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (Handshake, HandshakeAck, Reserve, KVData, Done, Failed, Abort, Heartbeat, Pong)
}


def encode(msg: Message) -> bytes:
    return json.dumps({"type": type(msg).__name__, **asdict(msg)}).encode()


def decode(data: bytes) -> Message:
    """The message in `data`, every field checked (schemas.py); ValueError for anything else, counted
    in MALFORMED. Fields it does not know are ignored (a newer peer may send more)."""
    try:
        return _decode(data)
    except ValueError:
        MALFORMED.add()
        raise


def _decode(data: bytes) -> Message:
    try:
        obj = json.loads(data)
    except RecursionError as e:  # nested too deep for the parser: not a control message either
        raise ValueError("a control message nested too deep") from e
    if not isinstance(obj, dict):
        raise ValueError("a control message is a JSON object")
    cls = MESSAGE_TYPES.get(obj.pop("type", None)) if isinstance(obj.get("type"), str) else None
    if cls is None:
        raise ValueError("unknown control message type")
    values = {f.name: obj[f.name] for f in fields(cls) if f.name in obj}
    check_fields(cls.__name__, values)
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{cls.__name__}: {e}") from e

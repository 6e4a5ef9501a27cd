"""The control messages between a prefill and a decode instance, and their wire format.

    decode                                   prefill
      | Handshake(layout, model, kv_offer) ---> |   checked once per peer; a mismatch is refused
      | <--- HandshakeAck(ok, reason, kv_path)  |   the prefill picks how KV travels to this peer
      | Reserve(T, prompt, params, blocks) ---> |   decode has reserved `blocks` for T's prompt
      | <-------- KVData(T, blocks) + raw bytes |   written straight into the reserved blocks
      | <-------------------- Done(T, token)    |   the first token; prefill frees its blocks
      | Abort(T) / Heartbeat  ----------------> |
      | <----------------- Failed(T) / Pong     |

Each message is one small JSON frame (a `type` field plus the dataclass fields). How KVData's bytes
travel is the transport's business (transport/): raw bytes after the frame (tcp), over a per-pair NCCL
link announced by `KVData.link` (nccl), or not at all: `KVData.written` says the sender already wrote
them into the reserved blocks (cuda_ipc), so that message is the proof the write is complete. Every
message names its sender's address so replies need no socket identity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
    """The message in `data`; ValueError (or TypeError) for anything else, including a sender that
    is not an address (replies go to it) or a transfer id that is not a string."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("a control message is a JSON object")
    cls = MESSAGE_TYPES.get(obj.pop("type", None))
    if cls is None:
        raise ValueError("unknown control message type")
    names = {f.name for f in fields(cls)}
    msg = cls(**{k: v for k, v in obj.items() if k in names})
    if not isinstance(msg.sender, str) or not isinstance(getattr(msg, "transfer_id", ""), str):
        raise ValueError("sender and transfer_id must be strings")
    return msg

"""Every control message a peer sends is checked before it touches anything (no model needed):

- decode: each field's type, range and size (disagg/schemas.py); a bad one is a ValueError, counted;
- over real TcpTransports: malformed messages are dropped and counted, the channel goes on;
- prefill side: a Reserve that can never be served is refused as "invalid"; an Abort counts only
  from the transfer's decode instance;
- decode side: KV bytes, fences and first tokens count only from the transfer's prefill instance, for
  its reserved blocks, of their size, in the vocabulary; anything else fails the transfer or is dropped;
- SamplingParams (the check a Reserve's parameters go through) rejects wrong types, not only ranges.
"""

from __future__ import annotations

import json
import math
import queue
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from pdserve.disagg import protocol as p
from pdserve.disagg import schemas
from pdserve.disagg.actions import Action, Activate, Cancel, Fail, StartPrefill
from pdserve.disagg.connector import KVConnector
from pdserve.disagg.handoff import FirstToken, FromPrefill
from pdserve.disagg.transport.auth import answer_listener
from pdserve.disagg.transport.tcp import TcpTransport, data_address
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidRequestError
from tests.e2e.cluster import cluster_secret

VOCAB = 100
BLOCK_SIZE = 4
ADDR = "tcp://127.0.0.1:5601"

VALID: dict[str, dict[str, Any]] = {
    "Handshake": {"model": "m", "layout": {"block_size": 4}, "kv_offer": {"kinds": {"tcp": {}}}},
    "HandshakeAck": {"ok": True, "reason": "", "kv_path": {"kind": "tcp"}},
    "Reserve": {
        "transfer_id": "ab12",
        "prompt_token_ids": [1, 2, 3],
        "params": {"temperature": 0.0},
        "block_ids": [0],
        "timeout": 30,
    },
    "KVData": {"transfer_id": "ab12", "block_ids": [0, 1], "nbytes": 256, "written": False, "link": ""},
    "Done": {
        "transfer_id": "ab12",
        "token_id": 7,
        "logprob": {"token_id": 7, "logprob": -0.5, "top": [[7, -0.5], [3, -1.5]]},
        "num_cached_tokens": 0,
    },
    "Failed": {"transfer_id": "ab12", "reason": "x", "refused": ""},
    "Abort": {"transfer_id": "ab12"},
    "Heartbeat": {"transfer_ids": ["ab12", "cd34"]},
    "Pong": {"unknown_transfer_ids": []},
}

BAD_FIELDS: list[tuple[str, str, Any]] = [
    ("Reserve", "sender", "ipc:///tmp/x"),
    ("Reserve", "sender", "tcp://127.0.0.1:0"),
    ("Reserve", "sender", "tcp://127.0.0.1:70000"),
    ("Reserve", "sender", 5),
    ("Reserve", "transfer_id", 5),
    ("Reserve", "transfer_id", ""),
    ("Reserve", "transfer_id", "a/b"),
    ("Reserve", "transfer_id", "x" * 65),
    ("Reserve", "cached_blocks", -1),
    ("Reserve", "cached_blocks", 1.0),
    ("Reserve", "cached_blocks", True),
    ("Reserve", "prompt_token_ids", [1.5, 2.5]),
    ("Reserve", "prompt_token_ids", [True, 2]),
    ("Reserve", "prompt_token_ids", [-1]),
    ("Reserve", "prompt_token_ids", [2**70]),
    ("Reserve", "prompt_token_ids", []),
    ("Reserve", "prompt_token_ids", "123"),
    ("Reserve", "params", [1]),
    ("Reserve", "params", {str(i): i for i in range(65)}),
    ("Reserve", "block_ids", [-1]),
    ("Reserve", "block_ids", [2**40]),
    ("Reserve", "block_ids", [0.0]),
    ("Reserve", "block_ids", list(range(schemas.MAX_BLOCKS + 1))),
    ("Reserve", "timeout", math.nan),
    ("Reserve", "timeout", math.inf),
    ("Reserve", "timeout", -1),
    ("Reserve", "timeout", "30"),
    ("KVData", "nbytes", -1),
    ("KVData", "nbytes", 1.0),
    ("KVData", "written", 1),
    ("KVData", "written", "true"),
    ("KVData", "block_ids", []),
    ("Done", "token_id", -1),
    ("Done", "token_id", 2**40),
    ("Done", "token_id", False),
    ("Done", "logprob", {"token_id": 7, "logprob": "x", "top": []}),
    ("Done", "logprob", {"token_id": 7, "logprob": math.nan, "top": []}),
    ("Done", "logprob", {"token_id": 7, "logprob": -1.0, "top": [[7]]}),
    ("Done", "logprob", {"token_id": 7, "logprob": -1.0, "top": [[-7, -1.0]]}),
    ("Done", "logprob", {"token_id": 7, "logprob": -1.0, "evil": 1}),
    ("Done", "logprob", 0.5),
    ("Done", "num_cached_tokens", -3),
    ("Failed", "reason", None),
    ("Failed", "refused", 1),
    ("HandshakeAck", "ok", "yes"),
    ("HandshakeAck", "kv_path", "tcp"),
    ("Handshake", "layout", None),
    ("Heartbeat", "transfer_ids", [1, 2]),
    ("Pong", "unknown_transfer_ids", "ab12"),
]


def _raw(kind: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, "sender": ADDR, **VALID[kind], **fields}).encode()


def _malformed() -> int:
    return schemas.MALFORMED.snapshot().get("malformed", 0)


@pytest.mark.parametrize("kind", list(VALID))
def test_valid_messages_decode_and_round_trip(kind):
    msg = p.decode(_raw(kind))
    assert type(msg).__name__ == kind
    assert p.decode(p.encode(msg)) == msg


@pytest.mark.parametrize(("kind", "name", "value"), BAD_FIELDS, ids=lambda v: str(v)[:24])
def test_a_field_out_of_its_schema_is_refused_and_counted(kind, name, value):
    before = _malformed()
    with pytest.raises(ValueError, match=f"{kind}.{name}"):
        p.decode(_raw(kind, **{name: value}))
    assert _malformed() == before + 1


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe", b"not json", b"[1, 2]", b'{"type": 5}', b'{"type": "Nope", "sender": "tcp://a:1"}',
     b"[" * 100_000, b'{"type": "Abort", "sender": "tcp://a:1"}', b'{"type": "Done", "sender": "tcp://a:1",'
     b' "transfer_id": "t", "token_id": 1' + b"9" * 5000 + b"}"],
    ids=["bytes", "text", "array", "type", "unknown", "deep", "missing", "huge-int"],
)  # fmt: skip
def test_what_is_no_message_at_all_is_refused(data):
    before = _malformed()
    with pytest.raises(ValueError):
        p.decode(data)
    assert _malformed() == before + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", "abc"), ("seed", 2**70), ("seed", True), ("top_k", 1.5), ("n", "2"), ("max_tokens", 2**70),
     ("temperature", "0"), ("temperature", 10**400), ("stop", [1]), ("stop_token_ids", [1.5]),
     ("ignore_eos", 1), ("logprobs", 2.0)],
)  # fmt: skip
def test_sampling_params_reject_wrong_types(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_sampling_params_take_ints_for_floats_and_numpy_numbers():
    import numpy as np

    params = SamplingParams(
        temperature=1, seed=np.int64(3), top_p=np.float32(0.5), stop_token_ids=[np.int32(2)]
    )
    assert params.temperature == 1.0 and type(params.seed) is int and params.stop_token_ids == [2]
    assert SamplingParams(seed=-(2**63)).seed == -(2**63) and SamplingParams(seed=2**63 - 1)


# ---- over real transports -------------------------------------------------------------------------------


class Peer:
    """Another instance as far as the connector can tell: a real TcpTransport whose messages (and
    payload bytes) land in a queue."""

    def __init__(self) -> None:
        self.transport = _transport()
        self.inbox: queue.Queue[tuple[p.Message, bytes | None]] = queue.Queue()
        self.answer: Callable[[p.Message], None] | None = None  # called on the transport's thread
        self.transport.start(self._on_message)

    def _on_message(self, msg: p.Message, data: memoryview | torch.Tensor | None) -> None:
        self.inbox.put((msg, None if data is None else bytes(data)))
        if self.answer is not None:
            self.answer(msg)

    @property
    def address(self) -> str:
        return self.transport.address

    def send(self, to: str, msg: p.Message, payload: Any = None) -> None:
        self.transport.send(to, msg, payload)

    def expect(self, cls: type[p.Message], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            msg, _ = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, cls):
                return msg


def _transport() -> TcpTransport:
    return TcpTransport("127.0.0.1", 0, secret=cluster_secret())


def _connector() -> KVConnector:
    pool = torch.zeros(2, 2, 8, BLOCK_SIZE, 1, 2)  # [layers, 2, blocks, block_size, heads, dim]: 128 B/block
    return KVConnector(_transport(), pool, {"block_size": BLOCK_SIZE}, "m", vocab_size=VOCAB)


@pytest.fixture
def ends() -> Iterator[tuple[KVConnector, Peer, Peer]]:
    """A connector on a real transport, and two peers."""
    c, a, b = _connector(), Peer(), Peer()
    try:
        yield c, a, b
    finally:
        for t in (c.transport, a.transport, b.transport):
            t.close()


def _actions(c: KVConnector, settle: float = 0.3) -> list[Action]:
    """What the connector queued within `settle` seconds."""
    time.sleep(settle)
    return c.poll()


def _wait_for(c: KVConnector, cls: type, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [a for a in c.poll() if isinstance(a, cls)]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no {cls.__name__} action")


def _dropped(c: KVConnector, reason: str) -> int:
    return c.messages_dropped.get(reason, 0)


def _reserve(peer: Peer, tid: str, prompt: list[Any], blocks: list[Any], **kw: Any) -> p.Reserve:
    params, timeout, cached = kw.pop("params", {}), kw.pop("timeout", 30.0), kw.pop("cached_blocks", 0)
    return p.Reserve(peer.address, tid, prompt, params, blocks, timeout, cached)


def test_malformed_messages_are_dropped_counted_and_the_channel_goes_on(ends):
    c, a, _ = ends
    before = _dropped(c, "malformed")
    bad = [
        _reserve(a, "t1", [1.5, 2.5], [0]),
        _reserve(a, "t2", [1, 2, 3], [-1]),
        _reserve(a, "t3", [1, 2, 3], [2**40]),
        _reserve(a, "t4", [1, 2, 3], [0], timeout=math.nan),
        p.Reserve("ipc:///evil", "t5", [1], {}, [0]),
        p.Abort(a.address, 17),  # type: ignore[arg-type]
    ]
    for msg in bad:
        a.send(c.address, msg)
    a.send(c.address, _reserve(a, "ok", [1, 2, 3], [0]))
    start = _wait_for(c, StartPrefill)
    assert start.target.transfer_id == "ok" and start.params == {}
    assert _dropped(c, "malformed") - before >= len(bad)
    assert a.inbox.empty(), "a malformed message was answered"


@pytest.mark.parametrize(
    ("prompt", "blocks", "why"),
    [([1, 2, VOCAB], [0], "token ids"), ([1, 2, 3], [0, 1], "destination blocks"),
     (list(range(1, 9)), [3, 3], "repeat"), ([1] * 9, [0, 1], "destination blocks")],
)  # fmt: skip
def test_a_reserve_that_can_never_be_served_is_refused_as_invalid(ends, prompt, blocks, why):
    c, a, _ = ends
    a.send(c.address, _reserve(a, "t1", prompt, blocks))
    failed = a.expect(p.Failed)
    assert failed.transfer_id == "t1" and failed.refused == "invalid" and why in failed.reason
    assert not [x for x in _actions(c) if isinstance(x, StartPrefill)]
    assert _dropped(c, "invalid") == 1


@pytest.mark.parametrize(
    ("length", "blocks", "cached", "why"),
    [(9, [5], 2, ""), (9, [5], 1, "destination blocks"), (8, [5], 2, "leave nothing"),
     (9, [5], 0, "destination blocks")],  # the last: a peer that reserved past a prefix, unsaid
)  # fmt: skip
def test_a_reserve_after_a_cached_prefix_names_the_blocks_it_lacks(ends, length, blocks, cached, why):
    """Blocks of 4: the destination blocks are those after the decode's `cached_blocks`, at least one."""
    c, a, _ = ends
    a.send(c.address, _reserve(a, "t1", list(range(1, length + 1)), blocks, cached_blocks=cached))
    if not why:
        start = _wait_for(c, StartPrefill)
        assert start.target.cached_blocks == cached and start.target.block_ids == tuple(blocks)
        return
    failed = a.expect(p.Failed)
    assert failed.refused == "invalid" and why in failed.reason


def test_a_transfer_id_in_use_is_refused_and_an_abort_counts_only_from_its_decode(ends):
    c, a, b = ends
    a.send(c.address, _reserve(a, "t1", [1, 2, 3], [0]))
    start = _wait_for(c, StartPrefill)
    b.send(c.address, _reserve(b, "t1", [4, 5, 6], [1]))  # another decode instance, the same id
    assert b.expect(p.Failed).refused == "invalid"
    b.send(c.address, p.Abort(b.address, "t1"))
    assert not [x for x in _actions(c) if isinstance(x, Cancel)], "a stranger aborted the transfer"
    assert _dropped(c, "wrong_sender") == 1
    a.send(c.address, p.Abort(a.address, "t1"))
    assert _wait_for(c, Cancel).request_id == start.request_id


def _receiving(c: KVConnector, a: Peer, request_id: str, blocks: list[int]) -> str:
    """Request `request_id` waits for `a`'s KV in `blocks`: the transfer id `a` was asked for."""
    c.start_receive(request_id, FromPrefill(a.address), [1, 2, 3, 4, 5][: 4 * len(blocks)], {}, blocks)
    return str(a.expect(p.Reserve).transfer_id)


def test_first_token_and_fences_count_only_from_the_transfer_prefill(ends):
    c, a, b = ends
    tid = _receiving(c, a, "r1", [2])
    for msg in (p.Done(b.address, tid, 5), p.Failed(b.address, tid, "x"), p.Pong(b.address, [tid])):
        b.send(c.address, msg)
    b.send(c.address, p.KVData(b.address, tid, [2], c.block_bytes), bytes(c.block_bytes))
    assert _actions(c, 0.5) == [] and _dropped(c, "wrong_sender") == 4
    a.send(c.address, p.Done(a.address, "nosuchtransfer", 5))
    assert _actions(c) == [] and _dropped(c, "unknown_transfer") == 1
    b.send(c.address, p.HandshakeAck(b.address, True, "", {"kind": "cuda_ipc"}))  # nobody asked b
    deadline = time.monotonic() + 5
    while not _dropped(c, "unasked") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _dropped(c, "unasked") == 1
    a.send(c.address, p.KVData(a.address, tid, [2], c.block_bytes, written=True))  # tcp writes no pools
    fail = _wait_for(c, Fail)
    assert fail.request_id == "r1" and "claims" in fail.reason
    a.send(c.address, p.Done(a.address, tid, 5))  # too late: the transfer has failed
    assert not [x for x in _actions(c) if isinstance(x, Activate)]


@pytest.mark.parametrize(
    ("done", "why"),
    [(dict(token_id=10**9), "vocabulary"), (dict(token_id=VOCAB), "vocabulary"),
     (dict(token_id=5, logprob={"token_id": 5, "logprob": -1.0, "top": [[VOCAB + 1, -2.0]]}), "vocabulary"),
     (dict(token_id=5, logprob={"token_id": 6, "logprob": -1.0, "top": []}), "another token"),
     (dict(token_id=5, num_cached_tokens=50), "cached")],
)  # fmt: skip
def test_a_first_token_outside_the_vocabulary_fails_the_transfer(ends, done, why):
    c, a, _ = ends
    tid = _receiving(c, a, "r1", [2])
    a.send(c.address, p.Done(a.address, tid, **done))
    fail = _wait_for(c, Fail)
    assert fail.request_id == "r1" and why in fail.reason


def test_kv_bytes_land_only_in_the_reserved_blocks_at_their_size(ends):
    c, a, _ = ends
    n = c.block_bytes
    tid = _receiving(c, a, "r1", [2])
    a.send(c.address, p.KVData(a.address, tid, [3], n), bytes(n))  # a block that is not reserved
    assert "not reserved" in _wait_for(c, Fail).reason
    tid = _receiving(c, a, "r2", [4])
    a.send(c.address, p.KVData(a.address, tid, [4], 2 * n), bytes(2 * n))  # the wrong size
    assert _wait_for(c, Fail).request_id == "r2"
    tid = _receiving(c, a, "r3", [5])
    a.send(c.address, p.KVData(a.address, tid, [5], 0))  # no bytes at all, on the control channel
    assert _wait_for(c, Fail).request_id == "r3"
    assert not c.kv_cache.any(), "bytes of a failed transfer landed in the pool"
    tid = _receiving(c, a, "r4", [6, 1])
    kv = torch.arange(2 * n // 4, dtype=torch.float32).numpy().tobytes()
    a.send(c.address, p.KVData(a.address, tid, [6, 1], 2 * n), kv)
    a.send(c.address, p.Done(a.address, tid, 5))
    ready = _wait_for(c, Activate)
    assert ready.request_id == "r4" and ready.first == FirstToken(5)
    assert c.kv_cache[:, :, [6, 1]].any() and not c.kv_cache[:, :, [2, 3, 4, 5]].any()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_payload_claimed_larger_than_any_transfer_is_not_read(ends):
    """An authenticated peer naming 1 TiB of bytes on the data port: the transfer fails and the
    receiver never allocates for it (before: bytearray(2**40), a MemoryError in the data thread)."""
    c, a, _ = ends
    tid = _receiving(c, a, "r1", [2])
    header = p.encode(p.KVData(a.address, tid, [2], 1 << 40))
    with socket.create_connection(data_address(c.address), timeout=5) as sock:
        answer_listener(sock, cluster_secret())
        sock.sendall(struct.pack("!I", len(header)) + header)
        assert _wait_for(c, Fail).request_id == "r1"
        assert sock.recv(1) == b""  # the receiver dropped the connection
    tid = _receiving(c, a, "r2", [3])  # and still takes KV
    a.send(c.address, p.KVData(a.address, tid, [3], c.block_bytes), bytes(c.block_bytes))
    a.send(c.address, p.Done(a.address, tid, 5))
    assert _wait_for(c, Activate).request_id == "r2"

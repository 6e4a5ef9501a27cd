"""No message from a peer kills an engine, and an engine that does die takes its process down with a
non-zero status, so that a supervisor restarts it.

- A real prefill instance (`pdserve serve --role prefill`) gets Reserves no honest decode instance
  sends (seed "abc" or 2**70, float or out-of-vocabulary token ids, negative, huge or miscounted block
  ids, a prompt over the context) from a fake decode instance on the library's TcpTransport: each is
  refused as invalid or dropped, and counted; /health stays 200, the same Reserve as before gives the
  same first token and the same KV bytes, the pool is free.
- A real decode engine (in this process, on tcp) asks a fake prefill instance for KV: a first token
  of 10**9, a fence of a direct write on a path that writes nothing, and bytes from another instance
  fail only their requests (no token from stale blocks); the engine then answers as before.
- A tensor-parallel instance whose worker is SIGKILLed answers the request in flight with an error
  and exits with EngineDeadError.EXIT_STATUS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.disagg import protocol as p
from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.engine import Engine
from pdserve.engine.outputs import RequestOutput as Output
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import EngineDeadError
from tests.e2e.cluster import Instance, cluster_secret
from tests.unit.test_peer_messages import Peer

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0, "max_tokens": 8}
BLOCK_SIZE = 16  # CacheConfig's default, which the instances use


def _blocks(n_tokens: int, first: int = 0) -> list[int]:
    return list(range(first, first + -(-n_tokens // BLOCK_SIZE)))


@pytest.fixture(scope="module")
def prompt(tokenizer: Any) -> list[int]:
    return list(tokenizer.encode(PROMPT))


@pytest.fixture
def peer() -> Iterator[Peer]:
    fake = Peer()
    try:
        yield fake
    finally:
        fake.transport.close()


# ---- a prefill instance and a fake decode instance --------------------------------------------------------


def _prefill_once(peer: Peer, kv_addr: str, tid: str, prompt: list[int]) -> tuple[int, bytes]:
    """Ask the prefill instance for `prompt`'s KV as transfer `tid`: its first token and KV bytes."""
    peer.send(kv_addr, p.Reserve(peer.address, tid, prompt, GREEDY, _blocks(len(prompt)), 60.0))
    token, kv = None, None
    deadline = time.monotonic() + 120
    while token is None or kv is None:
        msg, payload = peer.inbox.get(timeout=max(0.1, deadline - time.monotonic()))
        assert not isinstance(msg, p.Failed), f"the prefill instance failed {tid}: {msg.reason}"
        if isinstance(msg, p.Done) and msg.transfer_id == tid:
            token = msg.token_id
        elif isinstance(msg, p.KVData) and msg.transfer_id == tid:
            kv = payload
    return token, kv


def _bad_reserves(peer: Peer, prompt: list[int], vocab: int) -> tuple[dict[str, p.Reserve], list[p.Reserve]]:
    """Reserves the prefill must refuse as invalid (by transfer id), and ones it must drop unread."""
    n, blocks, a = len(prompt), _blocks(len(prompt)), peer.address

    def reserve(tid: str, ids: list[Any], params: dict[str, Any], block_ids: list[Any]) -> p.Reserve:
        return p.Reserve(a, tid, ids, params, block_ids, 60.0)

    refused = [
        reserve("seed-abc", prompt, {"seed": "abc"}, blocks),
        reserve("seed-huge", prompt, {"seed": 2**70}, blocks),
        reserve("temperature-text", prompt, {"temperature": "hot"}, blocks),
        reserve("unknown-param", prompt, {"bogus": 1}, blocks),
        reserve("vocab", [*prompt[:-1], vocab], GREEDY, blocks),
        reserve("block-count", prompt, GREEDY, [*blocks, 99]),
        reserve("block-repeat", prompt * 4, GREEDY, [7] * len(_blocks(4 * n))),
        reserve("context", [1] * 9000, GREEDY, list(range(10**6, 10**6 + 563))),
    ]
    dropped = [
        reserve("floats", [1.5, 2.5], GREEDY, [0]),
        reserve("negative-block", prompt, GREEDY, [-1]),
        reserve("huge-block", prompt, GREEDY, [2**40]),
        reserve("bool-token", [True, 2], GREEDY, [0]),
        p.Reserve("ipc:///not-an-address", "sender", prompt, GREEDY, blocks),
    ]
    return {r.transfer_id: r for r in refused}, dropped


def test_a_prefill_instance_refuses_bad_reserves_and_serves_on(model_dir, prompt, peer, tmp_path):
    inst = Instance("prefill", "prefill", model_dir, tmp_path, extra=["--kv-transport", "tcp"]).start()
    try:
        inst.wait_ready()
        kv_addr = inst.info()["kv_addr"]
        token, kv = _prefill_once(peer, kv_addr, "before", prompt)
        vocab = 49152  # SmolLM2's
        refused, dropped = _bad_reserves(peer, prompt, vocab)
        for msg in [*refused.values(), *dropped]:
            peer.send(kv_addr, msg)
        answers: dict[str, str] = {}  # transfer id -> why it was refused
        while not set(refused) <= set(answers):
            failed = peer.expect(p.Failed, timeout=60)
            answers[failed.transfer_id] = failed.refused
        assert answers == dict.fromkeys(refused, "invalid"), "refused otherwise, or a dropped one answered"
        assert inst.get("/health").status_code == 200
        assert _prefill_once(peer, kv_addr, "after", prompt) == (token, kv), "the answer changed"
        assert inst.metric("pdserve_peer_messages_dropped_total", reason="malformed") >= len(dropped)
        assert inst.metric("pdserve_peer_messages_dropped_total", reason="invalid") >= 4
        assert inst.wait_pool_free()["pool_free"]
        assert peer.inbox.empty(), "a dropped message was answered"
    finally:
        inst.stop()
    assert inst.proc is not None and inst.proc.popen is not None and inst.proc.popen.returncode == 0


# ---- a decode engine and a fake prefill instance ----------------------------------------------------------


def _decode_engine(model_dir: str) -> Engine:
    from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig

    return Engine(
        EngineConfig(
            model=ModelConfig(path=model_dir, device="cpu", dtype="float32"),
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=64),
            disagg=DisaggConfig(
                role="decode", kv_transport="tcp", peer_timeout=1.0, cluster_secret=cluster_secret()
            ),
        )
    )


def _run(engine: Engine, request_id: str, prompt: list[int], source: FromPrefill | None = None) -> Output:
    """Add a request and step until it ends (the peer answers from its own thread meanwhile)."""
    engine.add_request(request_id, prompt, SamplingParams(**GREEDY), source)
    tokens: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for out in engine.step():
            tokens += out.new_token_ids
            if out.request_id == request_id and out.finished:
                out.new_token_ids = tokens
                return out
        time.sleep(0.005)
    raise AssertionError(f"{request_id} did not end")


def _lie(peer: Peer, other: Peer, engine: Engine, lie: str) -> None:
    """Answer the engine's next Reserve with `lie`, from `peer`'s transport thread."""
    assert engine.connector is not None
    addr, nbytes = engine.connector.address, engine.connector.block_bytes

    def answer(msg: p.Message) -> None:
        if not isinstance(msg, p.Reserve):
            return
        tid, size = msg.transfer_id, len(msg.block_ids) * nbytes
        if lie == "huge-token":  # the KV bytes are fine, the first token is not
            peer.send(addr, p.KVData(peer.address, tid, msg.block_ids, size), bytes(size))
            peer.send(addr, p.Done(peer.address, tid, 10**9))
        elif lie == "fence-without-bytes":  # tcp writes nothing into the pool: no fence can be true
            peer.send(addr, p.KVData(peer.address, tid, msg.block_ids, size, written=True))
            peer.send(addr, p.Done(peer.address, tid, 42))
        elif lie == "bytes-from-another":  # the bytes come from an instance that was not asked
            other.send(addr, p.KVData(other.address, tid, msg.block_ids, size), bytes(size))
            peer.send(addr, p.Done(peer.address, tid, 42))

    peer.answer = answer


def test_a_lying_prefill_fails_only_its_request(model_dir, prompt, peer):
    engine, other = _decode_engine(model_dir), Peer()
    try:
        before = _run(engine, "local-before", prompt)
        for lie in ("huge-token", "fence-without-bytes", "bytes-from-another"):
            _lie(peer, other, engine, lie)
            out = _run(engine, lie, prompt, FromPrefill(peer.address))
            assert out.finish_reason == "error" and out.new_token_ids == [], (lie, out)
        assert _run(engine, "local-after", prompt).new_token_ids == before.new_token_ids
        assert engine.check_pool_free()
        assert engine.stats().peer_messages_dropped.get("wrong_sender", 0) >= 1
    finally:
        engine.close()
        other.transport.close()


# ---- an engine that dies ----------------------------------------------------------------------------------


def _workers(parent: int) -> list[int]:
    """The tensor-parallel worker processes `parent` spawned."""
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
                pids.append(int(entry))
    return pids


def test_a_dead_engine_answers_with_an_error_and_exits_non_zero(tmp_path):
    from tests.engine.tiny_models import save_tiny_model

    model = save_tiny_model(str(tmp_path / "tiny"))
    inst = Instance("tp2", "both", model, tmp_path, extra=["--tp", "2", "--num-blocks", "64"]).start()
    try:
        inst.wait_ready()
        assert inst.proc is not None and inst.proc.popen is not None
        (worker,) = _workers(inst.proc.pid)
        os.kill(worker, signal.SIGKILL)
        body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.0}
        with contextlib.suppress(httpx.HTTPError):  # an error answer, or the connection closed as it exits
            r = httpx.post(f"{inst.url}/v1/completions", json=body, timeout=60)
            assert r.status_code >= 500, r.text
        assert inst.proc.popen.wait(60) == EngineDeadError.EXIT_STATUS, inst.proc.log()
    finally:
        inst.stop()

"""Fuzz of the KV control protocol (pdserve/disagg/protocol.py): generated frames, valid-shaped and
malformed, delivered to the control ports of a real prefill and a real decode instance of a 1P1D
cluster (two `pdserve serve` processes and a router, all with one cluster secret).

    decode()          arbitrary bytes -> ValueError / TypeError only, never a message whose fields
                      have the wrong types
    each instance     a few hundred frames of every type (and bytes that are no frame), from a peer
                      holding the secret: after each batch the instance still answers a valid
                      Handshake and a Heartbeat, its engine is alive (/health 200)
    a lying prefill   the decode instance asks us (posing as its prefill) for KV: we answer with
                      right or wrong bytes, tokens out of range, lies about direct writes, failures;
                      the request ends (no hang), and never with a 200 unless the KV bytes came
    afterwards        both pools free, and the cluster's greedy answer is what it was

Frames travel as a peer's would: through a TcpTransport (replies, KV bytes) and a ZeroMQ DEALER per
instance (frames no Message can hold), both with the cluster secret's CURVE keys. Deterministic
(derandomized hypothesis, no database) and bounded: an instance found dead ends its fuzz early;
every violation is gathered and reported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import httpx
import pytest
import torch
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pdserve.cluster_secret import sign_handoff
from pdserve.disagg import protocol as p
from pdserve.disagg.transport.tcp import TcpTransport
from tests.e2e.cluster import MODEL, Instance, Router, cluster_secret, wait_until
from tests.fuzz.strategies import NESTED_FRAME, ControlContext, Reply, control_frame, encode, prefill_replies

SECRET = cluster_secret()  # the one every instance and router of tests/e2e/cluster.py is given
REPLY_TIMEOUT_S = 10.0
SETTLE_S = 0.5  # how long a fake prefill's answers may take to end a request by themselves
GREEDY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0}
PROMPT = {"model": MODEL, "prompt": "List three colors:", "max_tokens": 3, "temperature": 0.0}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: every violation is reported
        suppress_health_check=list(HealthCheck),
    )


# ---- protocol.decode alone ---------------------------------------------------------------------------


def conforms(value: Any, hint: Any) -> bool:
    """Is `value` of the type `hint` names (bool is no int, an int is a float)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint in (str, bool, int, type(None)):
        return type(value) is hint
    if hint is float:
        return type(value) in (int, float)
    if origin is list:
        return type(value) is list and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return type(value) is dict and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    raise AssertionError(f"no check for {hint}")


def wrong_fields(msg: p.Message) -> list[str]:
    hints = typing.get_type_hints(type(msg))
    return [f.name for f in fields(msg) if not conforms(getattr(msg, f.name), hints[f.name])]


def test_decode_raises_value_or_type_error_or_returns_well_typed_messages() -> None:
    ctx = ControlContext("tcp://127.0.0.1:5601", layout={"num_layers": 30, "block_size": 16, "dtype": "f32"})
    violations: dict[str, tuple[int, bytes]] = {}

    def record(kind: str, frame: bytes) -> None:
        count, example = violations.get(kind, (0, frame))
        violations[kind] = (count + 1, example)

    @fuzz_settings(120)
    @example([NESTED_FRAME])  # deeper than json's recursion limit
    @given(st.lists(control_frame(ctx) | st.binary(max_size=64), min_size=25, max_size=25))
    def frames(batch: list[bytes]) -> None:
        for frame in batch:
            try:
                msg = p.decode(frame)
            except (ValueError, TypeError):
                continue
            except Exception as e:  # noqa: BLE001 - what the test looks for
                record(f"raised {type(e).__name__}", frame)
                continue
            for name in wrong_fields(msg):
                record(f"{type(msg).__name__}.{name} of the wrong type", frame)

    frames()
    report = [f"{n:4d} x {kind}: e.g. {example[:160]!r}" for kind, (n, example) in sorted(violations.items())]
    assert not violations, "protocol.decode let through:\n" + "\n".join(report)


# ---- the cluster and our peer ------------------------------------------------------------------------


@dataclass
class Cluster:
    prefill: Instance
    decode: Instance
    router: Router
    reference: str = ""  # the greedy answer before any fuzz

    def greedy(self) -> str:
        answer = httpx.post(f"{self.router.url}/v1/completions", json=GREEDY, timeout=60)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["text"])

    def revive(self) -> None:
        """Start again each instance whose engine an earlier test left dead (so that each test
        reports what it found itself), and wait until the router serves again."""
        dead = [i for i in (self.prefill, self.decode) if health(i)[0] != 200]
        for instance in dead:
            instance.restart()
        if dead:
            ok = wait_until(lambda: self.answers() == self.reference, 60.0, 0.5)
            assert ok, f"the cluster does not answer as before after restarting {[i.name for i in dead]}"

    def answers(self) -> str | None:
        with contextlib.suppress(AssertionError, httpx.HTTPError):
            return self.greedy()
        return None


@pytest.fixture(scope="module")
def cluster(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("control-fuzz")
    prefill = Instance("prefill", "prefill", model_dir, log_dir)
    decode = Instance("decode", "decode", model_dir, log_dir)
    router = Router(log_dir / "router.log", [prefill.url], [decode.url], health_interval=0.5)
    try:
        for instance in (prefill, decode):
            instance.start()
        for instance in (prefill, decode):
            instance.wait_ready()
        router.start().wait_healthy()
        up = Cluster(prefill, decode, router)
        up.reference = up.greedy()
        yield up
    finally:
        for proc in (router, prefill, decode):
            with contextlib.suppress(Exception):
                proc.stop()


class Peer:
    """Our end of the control channel: a TcpTransport (its address gets the replies; KV bytes leave
    from it), and a DEALER per instance for raw frames."""

    def __init__(self) -> None:
        kwargs: dict[str, Any] = {"secret": SECRET}
        self.transport = TcpTransport("127.0.0.1", 0, **kwargs)
        self.inbox: queue.SimpleQueue[p.Message] = queue.SimpleQueue()
        self.transport.start(self._on_message)
        self.zmq = zmq.Context()
        self.dealers: dict[str, zmq.Socket] = {}

    @property
    def address(self) -> str:
        return self.transport.address

    def _on_message(self, msg: p.Message, _payload: Any) -> None:
        if isinstance(msg, p.Heartbeat):  # a live prefill answers pings, or the decode gives up on it
            self.transport.send(msg.sender, p.Pong(self.address, []))
        self.inbox.put(msg)

    def send_frame(self, peer: str, frame: bytes) -> None:
        if peer not in self.dealers:
            sock = self.zmq.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # a CURVE client of the instance's CURVE server, with the cluster's keys
            sock.curve_publickey, sock.curve_secretkey = SECRET.curve_keypair("client")
            sock.curve_serverkey = SECRET.curve_keypair("server")[0]
            sock.connect(peer)
            self.dealers[peer] = sock
        self.dealers[peer].send(frame)

    def wait_for(
        self, match: Callable[[p.Message], bool], timeout: float = REPLY_TIMEOUT_S
    ) -> p.Message | None:
        """The first message (from now on) that `match`es; the others are dropped. None: none came."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                msg = self.inbox.get(timeout=min(left, 0.5))
                if match(msg):
                    return msg
        return None

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.inbox.get_nowait()

    def close(self) -> None:
        for sock in self.dealers.values():
            sock.close(0)
        self.zmq.term()
        self.transport.close()


@dataclass
class Handoff:
    """How a decode instance is told to fetch KV from us, and the KV layout it told us."""

    params: dict[str, Any]
    layout: dict[str, Any]
    block_bytes: int
    num_blocks: int  # reserved for PROMPT


def block_bytes(layout: dict[str, Any]) -> int:
    itemsize = getattr(torch, str(layout["dtype"]).removeprefix("torch.")).itemsize
    per_layer = 2 * layout["block_size"] * layout["num_kv_heads"] * layout["head_dim"]
    return int(layout["num_layers"] * per_layer * itemsize)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    ours = Peer()
    try:
        yield ours
    finally:
        ours.close()


@pytest.fixture(scope="module")
def handoff(cluster: Cluster, peer: Peer) -> Handoff:
    """Ask the decode instance for one transfer from us (signed hand-off fields) and learn its KV
    layout from the Handshake it sends."""
    fields = {"prefill_kv_addr": peer.address, "prefill_url": "http://127.0.0.1:9"}
    for params in (sign_handoff(SECRET, fields),):
        session = start_request(cluster, params)
        shake = peer.wait_for(lambda m: isinstance(m, p.Handshake), timeout=5.0)
        if shake is None:
            assert session.done(), "the decode instance neither asked us for KV nor answered"
            continue
        assert isinstance(shake, p.Handshake)
        reserve = peer.wait_for(lambda m: isinstance(m, p.Reserve))
        assert isinstance(reserve, p.Reserve)
        peer.send_frame(cluster.decode.info()["kv_addr"], encode(failed(peer, reserve.transfer_id)))
        session.result(timeout=30)
        return Handoff(params, shake.layout, block_bytes(shake.layout), len(reserve.block_ids))
    raise AssertionError(f"the decode instance takes no hand-off: {session.result().text}")


EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=2)


def start_request(cluster: Cluster, params: dict[str, Any]) -> concurrent.futures.Future[httpx.Response]:
    body = {**PROMPT, "kv_transfer_params": params}
    url = f"{cluster.decode.url}/v1/completions"
    return EXECUTOR.submit(httpx.post, url, json=body, timeout=60)


def failed(peer: Peer, transfer_id: str) -> dict[str, Any]:
    return {"type": "Failed", "sender": peer.address, "transfer_id": transfer_id, "reason": "fuzz: the end"}


# ---- the checks ------------------------------------------------------------------------------------------


@dataclass
class Findings:
    """Violations by kind, each with its count and first example; `dead` once the target is gone."""

    violations: dict[str, list[Any]] = field(default_factory=dict)
    frames: int = 0
    dead: bool = False

    def add(self, kind: str, example: Any) -> None:
        self.violations.setdefault(kind, [0, str(example)[:400]])[0] += 1

    def report(self) -> str:
        lines = [f"{len(self.violations)} kinds of violation after {self.frames} frames:"]
        lines += [
            f"  {n:4d} x {kind}\n         e.g. {ex}" for kind, (n, ex) in sorted(self.violations.items())
        ]
        return "\n".join(lines)


def still_answers(peer: Peer, target: str, layout: dict[str, Any]) -> str:
    """A valid Handshake and a Heartbeat to `target`: "" if it acked one and ponged the other."""
    probe = f"probe-{uuid.uuid4().hex}"
    peer.drain()
    peer.send_frame(
        target, encode({"type": "Handshake", "sender": peer.address, "model": MODEL, "layout": layout})
    )
    peer.send_frame(target, encode({"type": "Heartbeat", "sender": peer.address, "transfer_ids": [probe]}))
    acked: list[p.Message] = []

    def pong(msg: p.Message) -> bool:
        if isinstance(msg, p.HandshakeAck) and msg.sender == target and msg.ok:
            acked.append(msg)
        return isinstance(msg, p.Pong) and probe in msg.unknown_transfer_ids

    if peer.wait_for(pong) is None:
        return "no Pong to a valid Heartbeat: the control channel stopped answering"
    return "" if acked else "no HandshakeAck(ok) to a valid Handshake"


def check_alive(instance: Instance, findings: Findings, example: Any, problem: str = "") -> None:
    if problem:
        findings.add(problem, example)
    status, _ = health(instance)
    if status != 200:
        findings.add(f"{instance.name} engine dead (/health {status}): {death_note(instance)}", example)
        findings.dead = True


def health(instance: Instance) -> tuple[int, str]:
    """/health's status and body; 0 when nothing answers (a process whose engine died may exit)."""
    try:
        answer = instance.get("/health")
    except httpx.HTTPError as e:
        return 0, f"no answer ({type(e).__name__}): the process has exited?"
    return answer.status_code, answer.text[:200]


def death_note(instance: Instance) -> str:
    """Where the engine died, from its log: the last frames of the traceback and the error."""
    assert instance.proc is not None
    lines = instance.proc.log(60_000).splitlines()
    starts = [i for i, line in enumerate(lines) if "engine step failed" in line]
    if not starts:
        return "(no engine traceback in the log)"
    trace = lines[starts[-1] + 1 :]
    end = next((i for i, line in enumerate(trace[1:], 1) if not line.startswith(" ")), len(trace) - 1)
    return " | ".join(line.strip() for line in trace[max(end - 4, 0) : end + 1] if line.strip(" ^"))


def check_after(cluster: Cluster, findings: Findings) -> None:
    """Both engines alive, both pools free, the greedy answer unchanged: else a violation."""
    for instance in (cluster.prefill, cluster.decode):
        status, body = health(instance)
        if status != 200:
            findings.add(f"{instance.name} /health {status} after the fuzz", body)
            continue
        kv = instance.wait_pool_free(timeout=30.0)
        if not kv.get("pool_free"):
            findings.add(f"{instance.name} KV blocks still held after the fuzz", kv)
    answer = cluster.answers()
    if answer != cluster.reference:
        findings.add("the greedy answer through the router changed (None: failed)", f"{answer!r}")


# ---- fuzzed frames to each instance's control port -------------------------------------------------------


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_instance_survives_fuzzed_control_frames(
    cluster: Cluster, peer: Peer, handoff: Handoff, role: str
) -> None:
    cluster.revive()
    target = cluster.prefill if role == "prefill" else cluster.decode
    address = str(target.info()["kv_addr"])
    ctx = ControlContext(peer.address, layout=handoff.layout, block_bytes=handoff.block_bytes)
    findings = Findings()

    @fuzz_settings(25)
    @given(st.lists(control_frame(ctx), min_size=20, max_size=45))
    def batch(frames: list[bytes]) -> None:
        if findings.dead:
            return
        for frame in frames:
            peer.send_frame(address, frame)
        findings.frames += len(frames)
        check_alive(target, findings, frames, still_answers(peer, address, handoff.layout))

    batch()
    peer.drain()
    check_after(cluster, findings)
    assert not findings.violations, findings.report()
    assert findings.frames >= 500, f"only {findings.frames} frames were sent"


# ---- a lying prefill -------------------------------------------------------------------------------------


def send_reply(peer: Peer, decode_addr: str, reply: Reply) -> None:
    if reply.payload is not None and isinstance(reply.frame, dict):
        fields = {k: v for k, v in reply.frame.items() if k != "type"}
        peer.transport.send(decode_addr, p.KVData(**fields), reply.payload)
    else:
        peer.send_frame(decode_addr, reply.frame if isinstance(reply.frame, bytes) else encode(reply.frame))


def delivered(replies: list[Reply], right: int) -> bool:
    """Did all of the transfer's KV bytes go (as a payload of the right size)?"""
    return any(r.payload is not None and len(r.payload) == right for r in replies)


TID = "fuzz-transfer-id"  # stands for the transfer's id in generated replies
BLOCK_MARK = 10**7  # block ids from here stand for the transfer's blocks


def resolve(reply: Reply, tid: str, blocks: list[int]) -> Reply:
    """The generated reply, naming the real transfer and its blocks."""
    if isinstance(reply.frame, bytes):
        return Reply(reply.frame.replace(TID.encode(), tid.encode()), reply.payload)
    frame = {k: tid if v == TID else v for k, v in reply.frame.items()}
    marks = list(range(BLOCK_MARK, BLOCK_MARK + len(blocks)))
    if frame.get("block_ids") == marks:
        frame["block_ids"] = list(blocks)
    return Reply(frame, reply.payload)


def one_transfer(
    cluster: Cluster, peer: Peer, handoff: Handoff, replies: list[Reply], findings: Findings
) -> None:
    """One request to the decode instance, whose KV we (the prefill) answer with `replies`."""
    decode_addr = str(cluster.decode.info()["kv_addr"])
    peer.drain()
    session = start_request(cluster, handoff.params)
    reserve = peer.wait_for(lambda m: isinstance(m, p.Reserve))
    if not isinstance(reserve, p.Reserve):
        findings.add("no Reserve for a hand-off", session.result(timeout=30).text[:200])
        findings.dead = True
        return
    replies = [resolve(r, reserve.transfer_id, reserve.block_ids) for r in replies]
    for reply in replies:
        send_reply(peer, decode_addr, reply)
    findings.frames += len(replies)
    with contextlib.suppress(concurrent.futures.TimeoutError):
        session.result(timeout=SETTLE_S)  # KV bytes travel apart from the frames: give them time
    if not session.done():  # still waiting for us: end it as a prefill would
        peer.send_frame(decode_addr, encode(failed(peer, reserve.transfer_id)))
    try:
        answer = session.result(timeout=60)
    except (concurrent.futures.TimeoutError, httpx.HTTPError) as e:
        findings.add(f"the request did not end ({type(e).__name__})", replies)
        return
    if answer.status_code == 200 and not delivered(replies, len(reserve.block_ids) * handoff.block_bytes):
        findings.add("200 although no KV bytes came (stale blocks)", replies)
    check_alive(cluster.decode, findings, replies)


def test_decode_survives_a_lying_prefill(cluster: Cluster, peer: Peer, handoff: Handoff) -> None:
    cluster.revive()
    findings = Findings()

    blocks = tuple(range(BLOCK_MARK, BLOCK_MARK + handoff.num_blocks))
    ctx = ControlContext(peer.address, layout=handoff.layout, block_bytes=handoff.block_bytes)
    ctx.transfer_ids, ctx.block_ids = (TID, "t1", "t2"), blocks

    @fuzz_settings(30)
    @given(prefill_replies(ctx))
    def transfer(replies: list[Reply]) -> None:
        if not findings.dead:
            one_transfer(cluster, peer, handoff, replies, findings)

    transfer()
    peer.drain()
    check_after(cluster, findings)
    assert not findings.violations, findings.report()
    assert findings.frames >= 30, f"only {findings.frames} replies were sent"  # not vacuous: ~1 a session

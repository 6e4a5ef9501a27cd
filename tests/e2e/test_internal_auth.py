"""The internal channels admit only holders of the cluster secret: real instances, sockets, clients.

A 1P1D cluster (one prefill, one decode instance, a router; tests/e2e/cluster.py gives them one
secret; the `pair` fixture that test_structured_output.py shares) is attacked the way issue 29 did it:

- a ZeroMQ DEALER on the prefill's KV control port (`kv_addr` from /pd/info): without CURVE, with
  CURVE but another cluster's keys, and with the right server key but a client key of its own; it
  sends a Handshake naming its own listener and the Reserves that used to kill the engine. None of it
  reaches the connector: the engine lives, nothing is sent back, the router still answers.
- raw TCP on the KV data ports: the listener's challenge comes first, a wrong answer closes it.
- a data listener that does not know the secret never gets a byte of KV (a real TcpTransport sends).
- a client posing as the router: forged, unsigned, expired or tampered kv_transfer_params get 403
  (permission_error, invalid_handoff_signature); on an instance that is not a decode instance, 400.
- `pdserve serve --role prefill` without a secret exits 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest
import zmq

from pdserve.cluster_secret import SECRET_ENV, ClusterSecret, sign_handoff
from pdserve.disagg import protocol as p
from pdserve.disagg.transport.tcp import TcpTransport, data_address
from tests.e2e.cluster import MODEL, ROOT, Pair, cluster_secret, free_port, wait_until

QUIET_S = 1.5  # how long an attacker waits for an answer that must not come
ISSUE_RESERVE = {  # issue 29, item 1: this one message killed the prefill engine for good
    "type": "Reserve",
    "sender": "tcp://127.0.0.1:1",
    "transfer_id": "x",
    "prompt_token_ids": [1, 2, 3],
    "params": {"seed": "abc"},
    "block_ids": [0],
    "timeout": 30,
}
VARIANTS: list[dict[str, Any]] = [  # and so did these
    {"params": {"seed": 2**70}},
    {"prompt_token_ids": [1.5, 2.5]},
    {"params": {}},  # a valid one: the prefill would have computed it and sent back its KV
]
OTHER = ClusterSecret.from_text("another cluster's secret, not ours")


def complete(base_url: str, **extra: Any) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)
    answer = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0.0, **extra
    )
    return answer.choices[0].text


def assert_alive(pair: Pair) -> None:
    """Both engines healthy, the router answers, every KV pool free again."""
    for instance in pair.instances:
        assert instance.get("/health").status_code == 200, instance.proc and instance.proc.log()
    assert complete(pair.router.url)
    for instance in pair.instances:
        assert instance.wait_pool_free()["pool_free"]


# ---- the KV control port (ZeroMQ) --------------------------------------------------------------------


def _attacker(ctx: zmq.Context, keys: str) -> zmq.Socket:
    """A DEALER: "plain" (no CURVE), "other" (CURVE, another cluster's keys), "client" (CURVE, our
    server's key but a client key that is not the cluster's)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys != "plain":
        public, secret = zmq.curve_keypair()
        server = (OTHER if keys == "other" else cluster_secret()).curve_keypair("server")[0]
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    return sock


def _reply_listener(ctx: zmq.Context, keys: str) -> zmq.Socket:
    """Where the attacker asks for answers: none may come. Behind a CURVE attacker it takes the
    cluster's own DEALERs, so an answer would get through if the prefill took the attacker's message."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys != "plain":
        sock.curve_publickey, sock.curve_secretkey = cluster_secret().curve_keypair("server")
        sock.curve_server = True
    return sock


def _attack_messages(reply_to: str, model: str) -> list[bytes]:
    """A Handshake that asks for an answer at `reply_to`, the issue's Reserve and its variants."""
    mine = [
        {**ISSUE_RESERVE, "sender": reply_to, "transfer_id": f"y{i}", **v} for i, v in enumerate(VARIANTS)
    ]
    hello = p.encode(p.Handshake(reply_to, model, {}))
    return [hello, *(json.dumps(m).encode() for m in [ISSUE_RESERVE, *mine])]


def test_control_port_refuses_peers_without_the_secret(pair: Pair) -> None:
    info = pair.prefill.info()
    ctx = zmq.Context()
    try:
        listeners, attackers = {}, {}
        for keys in ("plain", "other", "client"):  # all at once: one quiet wait for the three
            listener = listeners[keys] = _reply_listener(ctx, keys)
            port = listener.bind_to_random_port("tcp://127.0.0.1")
            attacker = attackers[keys] = _attacker(ctx, keys)
            attacker.connect(info["kv_addr"])
            for message in _attack_messages(f"tcp://127.0.0.1:{port}", info["model"]):
                attacker.send(message)
        time.sleep(QUIET_S)
        answered = [k for k in listeners if listeners[k].poll(0) or attackers[k].poll(0)]
        assert not answered, f"the prefill answered peers without the secret: {answered}"
    finally:
        ctx.destroy(0)
    assert_alive(pair)
    assert pair.prefill.proc is not None
    assert "refused a peer without the cluster secret" in pair.prefill.proc.log(200_000)


# ---- the KV data ports (plain TCP) -------------------------------------------------------------------


def _closed(conn: socket.socket, timeout: float = 10.0) -> bool:
    """Does the peer close `conn` (reading whatever it sends meanwhile) within `timeout`?"""
    conn.settimeout(timeout)
    try:
        while conn.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_data_ports_close_connections_that_fail_the_challenge(pair: Pair) -> None:
    header = p.encode(p.KVData("tcp://127.0.0.1:1", "x0", [0, 1], 64))
    frame = struct.pack("!I", len(header)) + header + bytes(64)  # what an old-protocol sender writes
    for instance in (pair.prefill, pair.decode):
        addr = data_address(instance.info()["kv_addr"])
        with socket.create_connection(addr, timeout=5) as conn:  # answers the challenge wrongly
            conn.settimeout(5)
            nonce = conn.recv(16, socket.MSG_WAITALL)
            assert len(nonce) == 16, "the listener did not open with its challenge"
            conn.sendall(bytes(16) + OTHER.mac("data-client", nonce, bytes(16)))
            assert _closed(conn)
        with socket.create_connection(addr, timeout=5) as conn:  # ignores it, sends KV straight away
            conn.sendall(frame)
            assert _closed(conn)
    assert_alive(pair)


def _fake_listener() -> tuple[socket.socket, str]:
    """A KV data listener answering the challenge with `secret`; the control address it stands for."""
    while True:
        control = free_port()
        with contextlib.suppress(OSError):
            return socket.create_server(("127.0.0.1", control + 1)), f"tcp://127.0.0.1:{control}"


def _bytes_after_challenge(listener: socket.socket, secret: ClusterSecret) -> bytes:
    """Accept one connection, play the listener's part of the challenge with `secret`, and return
    every byte the connector writes after it."""
    listener.settimeout(10)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        ours = os.urandom(16)
        conn.sendall(ours)
        answer = conn.recv(48, socket.MSG_WAITALL)
        conn.sendall(secret.mac("data-server", answer[:16], ours))
        conn.settimeout(1)  # the sender keeps a link open: a second of silence ends what it sends
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := conn.recv(65536):
                received += chunk
        return received


@pytest.mark.parametrize("listener_secret", ["ours", "other"])
def test_kv_is_sent_only_to_a_listener_that_proves_the_secret(listener_secret: str) -> None:
    secret = cluster_secret()
    listener, peer = _fake_listener()
    sender = TcpTransport(secret=secret)
    sender.start(lambda msg, payload: None)
    try:
        payload = b"KV!" * 1000
        sender.send(peer, p.KVData(sender.address, "t", [0], len(payload)), payload)
        received = _bytes_after_challenge(listener, secret if listener_secret == "ours" else OTHER)
    finally:
        sender.close()
        listener.close()
    if listener_secret == "ours":
        assert received.endswith(payload)
    else:
        assert received == b""


def test_transports_talk_with_the_same_secret_only() -> None:
    """Control messages and KV between two real TcpTransports: delivered with one secret, not with two."""
    got: dict[str, list[tuple[str, bytes | None]]] = {"b": [], "c": []}
    a = TcpTransport(secret=cluster_secret())
    b = TcpTransport(secret=cluster_secret())
    c = TcpTransport(secret=OTHER)
    for name, t in (("b", b), ("c", c)):
        t.start(lambda msg, data, n=name: got[n].append((type(msg).__name__, data and bytes(data))))
    a.start(lambda msg, payload: None)
    try:
        for peer in (b.address, c.address):
            a.send(peer, p.Heartbeat(a.address, ["t"]))
            a.send(peer, p.KVData(a.address, "t", [0], 4), b"abcd")
        assert wait_until(lambda: len(got["b"]) == 2, 10)
        time.sleep(QUIET_S)
    finally:
        for t in (a, b, c):
            t.close()
    assert sorted(got["b"]) == [("Heartbeat", None), ("KVData", b"abcd")]
    assert got["c"] == []


# ---- the hand-off fields on a client request ---------------------------------------------------------


def _params(pair: Pair) -> dict[str, Any]:
    return {"prefill_kv_addr": pair.prefill.info()["kv_addr"], "prefill_url": pair.prefill.url}


def _post(url: str, params: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "kv_transfer_params": params}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def test_decode_refuses_hand_off_fields_the_cluster_did_not_sign(pair: Pair) -> None:
    secret, fields = cluster_secret(), _params(pair)
    signed = sign_handoff(secret, fields)
    forged = {
        "unsigned": fields,
        "another cluster's": sign_handoff(OTHER, fields),
        "expired": sign_handoff(secret, fields, ttl=-1.0),
        "tampered": {**signed, "prefill_url": "http://127.0.0.1:1"},
        "no expiry": {**signed, "expires": None},
        "malformed": {**signed, "signature": "not hex"},
    }
    for name, params in forged.items():
        answer = _post(pair.decode.url, params)
        assert answer.status_code == 403, (name, answer.text)
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("permission_error", "invalid_handoff_signature"), name
    with pytest.raises(openai.PermissionDeniedError) as refused:  # as an OpenAI client sees it
        complete(pair.decode.url, extra_body={"kv_transfer_params": fields})
    assert refused.value.code == "invalid_handoff_signature"
    # what the router signs is taken: the same answer as through the router
    direct = complete(pair.decode.url, extra_body={"kv_transfer_params": signed})
    assert direct == complete(pair.router.url)
    # an instance that takes no hand-offs says so, signed or not
    for params in (fields, signed):
        answer = _post(pair.prefill.url, params)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "kv_transfer_params"
    assert_alive(pair)


def test_colocated_instance_refuses_hand_off_fields(server: Any) -> None:
    params = sign_handoff(cluster_secret(), {"prefill_kv_addr": "tcp://127.0.0.1:9", "prefill_url": None})
    answer = _post(server.url, params, server.headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "kv_transfer_params"


# ---- startup ------------------------------------------------------------------------------------------


def test_network_roles_do_not_start_without_a_secret(model_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    serve = [sys.executable, "-m", "pdserve.cli", "serve", "--model", model_dir, "--device", "cpu"]
    serve += ["--port", str(free_port()), "--num-blocks", "16"]
    procs = [  # side by side: each spends its few seconds importing
        subprocess.Popen(
            [*serve, "--role", role, "--kv-transport", transport],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for role, transport in (("prefill", "tcp"), ("decode", "auto"))
    ]
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, stderr[-2000:]
            assert "--cluster-secret-file" in stderr and SECRET_ENV in stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

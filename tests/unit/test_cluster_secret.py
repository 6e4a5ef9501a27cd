"""The cluster secret: signed hand-offs (sign, verify, expiry, tampering), derived keys, how it is kept.

Also the two places that use it without a network: the decode side's check of kv_transfer_params
(server/protocol.KVTransferParams.verified) and the data connection's challenge over a socket pair.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from pdserve.cluster_secret import (
    SECRET_ENV,
    ClusterSecret,
    HandoffRefused,
    SecretError,
    check_handoff,
    sign_handoff,
)
from pdserve.config import DisaggConfig
from pdserve.disagg.transport import auth
from pdserve.errors import InvalidRequestError
from pdserve.server.protocol import KVTransferParams

TEXT = "correct horse battery staple"
SECRET = ClusterSecret.from_text(TEXT)
OTHER = ClusterSecret.from_text("another cluster's secret")
FIELDS = {"prefill_kv_addr": "tcp://10.0.0.1:5601", "prefill_url": "http://10.0.0.1:8001"}
NOW = 1_800_000_000.0


def test_a_signed_hand_off_passes_until_it_expires() -> None:
    signed = sign_handoff(SECRET, FIELDS, ttl=60, now=NOW)
    assert {k: signed[k] for k in FIELDS} == FIELDS and signed["expires"] == NOW + 60
    check_handoff(SECRET, signed, now=NOW)
    check_handoff(SECRET, signed, now=NOW + 59.9)
    with pytest.raises(HandoffRefused, match="expired"):
        check_handoff(SECRET, signed, now=NOW + 60.1)


def test_unsigned_forged_and_tampered_hand_offs_are_refused() -> None:
    signed = sign_handoff(SECRET, FIELDS, now=NOW)
    refused = [
        FIELDS,  # unsigned
        sign_handoff(OTHER, FIELDS, now=NOW),  # another cluster's
        {**signed, "prefill_kv_addr": "tcp://10.6.6.6:5601"},  # tampered, each field in turn
        {**signed, "prefill_url": None},
        {**signed, "expires": signed["expires"] + 3600},  # its life stretched
        {**signed, "extra": 1},  # a field added
        {k: v for k, v in signed.items() if k != "prefill_url"},  # a field taken away
        {**signed, "signature": "zz"},  # not hex
        {**signed, "signature": signed["signature"][:-2]},  # cut short
        {**signed, "signature": 7},
        {**signed, "expires": "never"},
    ]
    for params in refused:
        with pytest.raises(HandoffRefused):
            check_handoff(SECRET, params, now=NOW)


def test_signing_again_replaces_the_old_signature() -> None:
    first = sign_handoff(SECRET, FIELDS, now=NOW)
    again = sign_handoff(SECRET, first, now=NOW + 10)
    check_handoff(SECRET, again, now=NOW + 10)
    assert again["expires"] == NOW + 10 + 300


def test_keys_are_derived_per_use_and_parts_cannot_be_regrouped() -> None:
    assert ClusterSecret.from_text(f"  {TEXT}\n") == SECRET  # a file's trailing newline is not part of it
    assert SECRET.derive("handoff") != SECRET.derive("data-client") != SECRET.key
    assert SECRET.mac("l", b"ab", b"c") != SECRET.mac("l", b"a", b"bc")
    assert SECRET.mac("l", b"x") != SECRET.mac("m", b"x") != OTHER.mac("l", b"x")
    tag = SECRET.mac("l", b"x", b"y")
    assert SECRET.verify("l", tag, b"x", b"y") and not SECRET.verify("l", tag, b"y", b"x")


def test_curve_key_pairs_are_valid_and_differ_per_side_and_cluster() -> None:
    public, secret_key = SECRET.curve_keypair("server")
    assert zmq.curve_public(secret_key) == public and len(z85.decode(public)) == 32
    assert SECRET.curve_keypair("client")[0] != public != OTHER.curve_keypair("server")[0]
    assert SECRET.curve_keypair("server") == ClusterSecret.from_text(TEXT).curve_keypair("server")


def test_the_secret_never_shows_in_a_repr() -> None:
    config = DisaggConfig(role="decode", cluster_secret=SECRET)
    for text in (repr(SECRET), str(SECRET), repr(config), str(config)):
        assert TEXT not in text and SECRET.key.hex() not in text and repr(SECRET.key) not in text
    assert repr(SECRET) == "ClusterSecret(<hidden>)"


def test_a_created_file_is_its_owners_alone_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "cluster.secret"
    made = ClusterSecret.create_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ClusterSecret.from_file(path) == made
    assert ClusterSecret.create_file(tmp_path / "second") != made  # random each time


def test_short_missing_and_environment_secrets(tmp_path: Path) -> None:
    with pytest.raises(SecretError):
        ClusterSecret.from_text("too short")
    (tmp_path / "short").write_text("short\n")
    for path in (tmp_path / "short", tmp_path / "missing"):
        with pytest.raises(SecretError):
            ClusterSecret.from_file(path)
    assert ClusterSecret.from_env({}) is None and ClusterSecret.from_env({SECRET_ENV: ""}) is None
    assert ClusterSecret.from_env({SECRET_ENV: TEXT}) == SECRET
    with pytest.raises(SecretError):
        ClusterSecret.from_env({SECRET_ENV: "short"})


# ---- the decode side's check of kv_transfer_params ------------------------------------------------------


def test_kv_transfer_params_are_taken_only_signed_and_only_by_decode_instances() -> None:
    decode = DisaggConfig(role="decode", kv_transport="tcp", cluster_secret=SECRET)
    signed = KVTransferParams.model_validate(sign_handoff(SECRET, FIELDS))
    assert signed.verified(decode).handoff().prefill_kv_addr == FIELDS["prefill_kv_addr"]
    without_url = KVTransferParams.model_validate(sign_handoff(SECRET, {"prefill_kv_addr": "tcp://h:1"}))
    assert without_url.verified(decode).handoff().prefill_url is None  # the fields as sent, no more
    for params in (FIELDS, sign_handoff(OTHER, FIELDS), sign_handoff(SECRET, FIELDS, ttl=-1)):
        with pytest.raises(HandoffRefused):
            KVTransferParams.model_validate(params).verified(decode)
    with pytest.raises(HandoffRefused):  # no secret to check with: nothing is taken
        signed.verified(DisaggConfig(role="decode", kv_transport="inproc"))
    for role in ("both", "prefill"):
        with pytest.raises(InvalidRequestError) as e:
            signed.verified(DisaggConfig(role=role, cluster_secret=SECRET))
        assert e.value.param == "kv_transfer_params"


# ---- the data connection's challenge --------------------------------------------------------------------


def _challenge(listener_secret: ClusterSecret, connector_secret: ClusterSecret) -> tuple[str, str]:
    """Both sides of the challenge over a socket pair; what each side made of it ("ok" or the error)."""
    a, b = socket.socketpair()
    results = {"listener": "ok", "connector": "ok"}

    def listen() -> None:
        try:
            auth.challenge_connector(a, listener_secret)
        except OSError as e:
            results["listener"] = type(e).__name__
        a.close()  # as the transport does when the challenge fails

    thread = threading.Thread(target=listen)
    thread.start()
    try:
        auth.answer_listener(b, connector_secret)
    except OSError as e:
        results["connector"] = type(e).__name__
    thread.join(10)
    b.close()
    return results["listener"], results["connector"]


def test_the_data_challenge_passes_only_with_one_secret() -> None:
    assert _challenge(SECRET, SECRET) == ("ok", "ok")
    listener, connector = _challenge(SECRET, OTHER)
    assert listener == "ChallengeFailed" and connector != "ok"  # refused, and told by the close
    assert _challenge(OTHER, SECRET)[0] == "ChallengeFailed"


def test_a_silent_peer_is_cut_off_by_the_challenge_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "CHALLENGE_TIMEOUT_S", 0.2)
    a, b = socket.socketpair()
    with a, b, pytest.raises(TimeoutError):
        auth.challenge_connector(a, SECRET)  # b never answers

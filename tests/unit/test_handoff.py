"""The typed hand-off: frozen values, and the first token's wire form as protocol.Done carries it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import pytest

from pdserve.disagg import protocol as p
from pdserve.disagg.handoff import FirstToken, FromPrefill, ToDecode
from pdserve.engine.request import Logprob
from pdserve.server.protocol import KVTransferParams


def test_hand_off_values_are_frozen() -> None:
    target = ToDecode("t", "tcp://127.0.0.1:1", (3, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.transfer_id = "u"  # type: ignore[misc]


def test_first_token_wire_form_is_the_logprob_fields() -> None:
    """Done.logprob stays what asdict(Logprob) gave: the same JSON on the wire."""
    lp = Logprob(5, -0.25, [(5, -0.25), (9, -1.5)])
    first = FirstToken(5, -0.25, ((5, -0.25), (9, -1.5)))
    assert json.dumps(first.to_wire()) == json.dumps(asdict(lp))
    done = p.decode(p.encode(p.Done("tcp://h:1", "t", 5, first.to_wire(), 3)))
    assert isinstance(done, p.Done) and FirstToken.from_wire(done.token_id, done.logprob) == first
    assert FirstToken(5).to_wire() is None and FirstToken.from_wire(5, None) == FirstToken(5)


def test_kv_transfer_params_become_a_from_prefill() -> None:
    params = KVTransferParams.model_validate(
        {"prefill_kv_addr": "tcp://10.0.0.1:5601", "prefill_url": "http://p"}
    )
    assert params.handoff() == FromPrefill("tcp://10.0.0.1:5601", "http://p")

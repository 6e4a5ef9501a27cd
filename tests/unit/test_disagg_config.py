"""DisaggConfig refuses timeouts that would fail every transfer at once (0, negative) or never (inf)."""

from __future__ import annotations

import math

import pytest

from pdserve.config import DisaggConfig


@pytest.mark.parametrize("field", ["kv_transfer_timeout", "peer_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_timeouts_must_be_finite_and_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DisaggConfig(role="decode", **{field: value})


def test_small_finite_timeouts_are_accepted() -> None:
    config = DisaggConfig(role="decode", kv_transfer_timeout=0.2, peer_timeout=0.5)
    assert (config.kv_transfer_timeout, config.peer_timeout) == (0.2, 0.5)

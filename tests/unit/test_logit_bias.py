"""logit_bias in the engine: SamplingParams takes it as the HTTP edge and a peer's Reserve (JSON:
string keys) give it, and the sampler adds it to each row's logits (the Triton path:
tests/kernels/test_logit_bias_kernel.py). No model."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from pdserve.engine.penalties import apply_penalties
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, plain_sampling
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidRequestError


def _request(**params: object) -> Request:
    return Request("r", [1, 2], SamplingParams(**params), eos_token_ids=())  # type: ignore[arg-type]


def test_a_reserve_round_trip_keeps_the_bias() -> None:
    params = SamplingParams(logit_bias={5: 100, 7: -2.5})
    wire = json.loads(json.dumps(asdict(params)))  # what a prefill instance gets: {"5": 100.0, ...}
    assert SamplingParams(**wire).logit_bias == {5: 100.0, 7: -2.5}


@pytest.mark.parametrize(
    "bias", [{-1: 1.0}, {"x": 1.0}, {"1e3": 1.0}, {1: 101}, {1: float("nan")}, {1: True}, [1]]
)
def test_bad_bias_is_refused(bias: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]
    assert e.value.param == "logit_bias"


def test_bias_is_added_and_ids_past_the_vocabulary_are_left_out() -> None:
    logits = torch.zeros(2, 4)
    apply_penalties(logits, [_request(logit_bias={1: 3.0, 9: 100.0}), _request()])
    assert logits.tolist() == [[0.0, 3.0, 0.0, 0.0], [0.0] * 4]


@pytest.mark.parametrize(
    "params", [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.0, "seed": 3}]
)
def test_plus_100_forces_and_minus_100_bans_on_the_torch_path(params: dict[str, object]) -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]] * 3)
    rows = [
        _request(**params, logit_bias={3: 100.0}),
        _request(**params, logit_bias={0: -100.0, 1: -100.0}),
        _request(**params),
    ]
    for _ in range(20):
        tokens = Sampler().sample_later(logits, rows).wait()
        assert tokens[0].token_id == 3 and tokens[1].token_id not in (0, 1)
    assert not plain_sampling(rows[0]) and plain_sampling(rows[2]) == ("seed" not in params)

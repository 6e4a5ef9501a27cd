"""The Triton sampler's path with logit_bias: a biased row goes through the penalties pass on a float32
copy before the one-launch kernel draws (+100 forces, -100 bans), and the model's logits stay as
they were. Under Triton's interpreter without CUDA, as test_triton_sampler.py."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling import SamplingParams
from pdserve.kernels import sampling_triton

from .triton_env import DEVICE, HAS_TRITON, interpreted_or_skip

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    interpreted_or_skip(sampling_triton._sample_kernel)


def test_biased_rows_take_the_kernel_with_the_bias_applied() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]] * 3, device=DEVICE)
    rows = [
        Request("a", [1], SamplingParams(temperature=0.0, logit_bias={3: 100.0})),
        Request("b", [1], SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0})),
        Request("c", [1], SamplingParams(temperature=0.0)),
    ]
    sampler = Sampler(sampling_triton.triton_sample)
    for _ in range(5):
        tokens = [r.token_id for r in sampler.sample_later(logits, rows).wait()]
        assert tokens[0] == 3 and tokens[1] not in (0, 1) and tokens[2] == 0
    assert logits[0].tolist() == [5.0, 4.0, 0.0, -1.0]

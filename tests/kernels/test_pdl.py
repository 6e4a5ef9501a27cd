"""When a kernel launch asks for programmatic dependent launch (kernels/pdl.py): only with PDL on
(the default; KernelConfig pdl=off turns it off), only for CUDA tensors on sm_90 or later, over at
most max_rows rows (the decode-attention kernels: attention_max_rows); a CPU launch (Triton's
interpreter) never. The engine's limits come from the tuning file."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import pdl

from .triton_env import build, hopper_tuning


@pytest.mark.parametrize("enabled", [False, True])
def test_cpu_launches_never_ask_for_it(enabled: bool) -> None:
    assert pdl.launch_options(torch.zeros(1), pdl.Pdl(enabled)) == {"PDL": False}


def test_the_engine_takes_the_tuned_row_limits() -> None:
    tuning = hopper_tuning()
    assert (tuning.pdl_max_rows, tuning.pdl_attention_max_rows) == (None, 64)
    for on in (False, True):
        kernels = build(attention="triton", pdl=on)
        assert kernels.attention is not None
        assert kernels.attention.paged_decode.keywords["pdl"] == pdl.Pdl(on, None, 64)  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enabled", [False, True])
def test_cuda_launches_ask_for_it_when_enabled_on_hopper(enabled: bool) -> None:
    hopper = torch.cuda.get_device_capability()[0] >= pdl.MIN_CAPABILITY
    on = enabled and hopper
    want = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
    assert pdl.launch_options(torch.zeros(1, device="cuda"), pdl.Pdl(enabled)) == want
    engine = pdl.Pdl(enabled, None, 64)
    assert pdl.launch_options(torch.zeros(4096, 8, device="cuda"), engine) == want
    assert pdl.launch_options(torch.zeros(64, 8, device="cuda"), engine, attention=True) == want
    assert pdl.launch_options(torch.zeros(65, 8, device="cuda"), engine, attention=True) == {"PDL": False}
    rows16 = pdl.Pdl(enabled, 16, 64)
    assert pdl.launch_options(torch.zeros(16, 8, device="cuda"), rows16) == want
    assert pdl.launch_options(torch.zeros(17, 8, device="cuda"), rows16) == {"PDL": False}

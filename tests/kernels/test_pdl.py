"""When a kernel launch asks for programmatic dependent launch (layers/pdl.py): only with PDL on
(the default; PDSERVE_PDL=0 turns it off), only for CUDA tensors on sm_90 or later, over at most
MAX_ROWS rows (the decode-attention kernels: ATTENTION_MAX_ROWS); a CPU launch (Triton's interpreter)
never."""

from __future__ import annotations

import pytest
import torch

from pdserve.layers import pdl


@pytest.mark.parametrize("enabled", [False, True])
def test_cpu_launches_never_ask_for_it(enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "ENABLED", enabled)
    assert pdl.launch_options(torch.zeros(1)) == {"PDL": False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enabled", [False, True])
def test_cuda_launches_ask_for_it_when_enabled_on_hopper(
    enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pdl, "ENABLED", enabled)
    hopper = torch.cuda.get_device_capability()[0] >= pdl.MIN_CAPABILITY
    on = enabled and hopper
    want = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
    assert pdl.launch_options(torch.zeros(1, device="cuda")) == want
    monkeypatch.setattr(pdl, "MAX_ROWS", None)
    monkeypatch.setattr(pdl, "ATTENTION_MAX_ROWS", 64)
    assert pdl.launch_options(torch.zeros(4096, 8, device="cuda")) == want
    assert pdl.launch_options(torch.zeros(64, 8, device="cuda"), attention=True) == want
    assert pdl.launch_options(torch.zeros(65, 8, device="cuda"), attention=True) == {"PDL": False}
    monkeypatch.setattr(pdl, "MAX_ROWS", 16)
    assert pdl.launch_options(torch.zeros(16, 8, device="cuda")) == want
    assert pdl.launch_options(torch.zeros(17, 8, device="cuda")) == {"PDL": False}

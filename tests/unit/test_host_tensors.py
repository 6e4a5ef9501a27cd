"""Step inputs packed through `array` + `torch.frombuffer`: the same tensors torch.tensor makes."""

from __future__ import annotations

import gc

import torch

from pdserve.host_tensors import long_tensor, padded_rows


def test_long_tensor_equals_torch_tensor_and_outlives_its_list() -> None:
    values = [0, 1, -1, 2**40, 7]
    t = long_tensor(values)
    del values
    gc.collect()
    assert t.dtype == torch.long and torch.equal(t, torch.tensor([0, 1, -1, 2**40, 7]))
    assert long_tensor([]).shape == (0,)


def test_padded_rows_pads_with_block_zero() -> None:
    rows = [[5, 6, 7], [8], [], [1, 2, 3]]
    t = padded_rows(rows, 4)
    assert torch.equal(t, torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 0]]))
    assert padded_rows([], 3).shape == (0, 3)

"""The top-k/top-p cut search (kernels/truncation_triton.py) against the definition, row by row: a token is
kept iff fewer than k tokens have a larger logit and the probability mass of those with a larger
logit is below p. Ties at the cut are all kept by both. Checked for fp16 (many ties) and fp32 rows,
every way of splitting rows over programs, greedy rows and -inf entries.

On CUDA the cases run on the GPU; without CUDA under Triton's interpreter, on shorter rows and
three of the six (dtype, chunks) cases: one chunk and several for fp16 (4 passes), several for
fp32 (8 passes). The checks are exact, so a smaller grid loses no statistical power.
"""

from __future__ import annotations

import pytest
import torch

from .triton_env import CUDA, DEVICE, HAS_TRITON, by_device, fix_interpreter, gpu

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    if not CUDA:
        fix_interpreter()


def _keys(logits: torch.Tensor) -> torch.Tensor:
    """The ordered integer keys truncation_triton.ordered_key gives, computed on the host."""
    if logits.dtype == torch.float32:
        bits = logits.view(torch.int32).long()
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)
    bits = logits.view(torch.int16).long()
    return bits ^ ((bits >> 15) & 0x7FFF)


def _wanted(row: torch.Tensor, temp: float, k: int, p: float) -> torch.Tensor:
    """Kept tokens by the definition, in float64; None where a token's mass above lies within
    rounding of p (either answer is right there)."""
    z = row.double() / temp
    probs = z.softmax(-1)
    larger = z[None, :] > z[:, None]  # [i, j]: z_j > z_i
    mass_above = (larger * probs[None, :]).sum(-1)
    count_above = larger.sum(-1)
    assert ((mass_above - p).abs() > 1e-5).all() or p >= 1.0, "a boundary within rounding"
    return (mass_above < p) & (count_above < k)


def _search(
    logits: torch.Tensor, temps: list[float], ks: list[int], ps: list[float], chunks: int, min_ps=None
):
    from pdserve.kernels.truncation_triton import search_cuts

    rows, vocab = logits.shape
    block = 256
    span = -(-vocab // (chunks * block)) * block
    chunks = -(-vocab // span)
    params = [1.0 / t if t > 0 else 0.0 for t in temps] + [float(k or vocab) for k in ks] + ps
    params += min_ps or [0.0] * rows
    top_p, top_k = any(p < 1.0 for p in ps), any(k > 0 for k in ks)  # as sampling_triton asks
    on_device = torch.tensor(params, device=logits.device)
    state_f, state_k = search_cuts(logits, on_device, chunks, span, block, top_p, top_k)
    cut = torch.maximum(state_k[:, 0], state_k[:, 2]).cpu()
    return _keys(logits.cpu()) >= cut[:, None], state_f.cpu()


@pytest.mark.parametrize(
    "dtype,chunks",
    [
        (torch.float16, 1),
        (torch.float16, 8),
        (torch.float32, 3),
        pytest.param(torch.float16, 3, marks=gpu),
        pytest.param(torch.float32, 1, marks=gpu),
        pytest.param(torch.float32, 8, marks=gpu),
    ],
)
def test_the_kept_tokens_are_the_definitions(dtype: torch.dtype, chunks: int) -> None:
    torch.manual_seed(chunks)
    vocab = by_device(1000, 2000)
    logits = (torch.randn(5, vocab) * 3).to(dtype)
    logits[1, :40] += 9.0  # a peaked row: the cut lies among few tokens
    logits[2, 100:300] = float("-inf")  # banned entries
    temps, ks, ps = [0.7, 1.0, 1.3, 0.9, 1.0], [0, 7, 0, 300, 1], [0.9, 1.0, 0.5, 0.95, 1.0]
    kept, _ = _search(logits.to(DEVICE), temps, ks, ps, chunks)
    for r in range(5):
        want = _wanted(logits[r], temps[r], ks[r] or vocab, ps[r])
        assert torch.equal(kept[r], want), (r, int(kept[r].sum()), int(want.sum()))


@pytest.mark.parametrize("only", ["top_p", "top_k"])
def test_a_batch_with_one_kind_of_cut_searches_only_that_one(only: str) -> None:
    torch.manual_seed(7)
    logits = (torch.randn(3, 900) * 2).to(torch.float16)
    ks, ps = ([0, 0, 0], [0.6, 0.9, 1.0]) if only == "top_p" else ([3, 40, 0], [1.0, 1.0, 1.0])
    kept, _ = _search(logits.to(DEVICE), [1.0, 0.8, 1.0], ks, ps, 2)
    for r in range(3):
        assert torch.equal(kept[r], _wanted(logits[r], [1.0, 0.8, 1.0][r], ks[r] or 900, ps[r])), r


def test_greedy_rows_and_rows_without_filters_keep_every_token() -> None:
    logits = torch.randn(3, 700)
    kept, state = _search(logits.to(DEVICE), [0.0, 1.0, 0.0], [5, 0, 0], [0.5, 1.0, 1.0], 2)
    assert kept[torch.isfinite(logits)].all()
    assert torch.allclose(state[:, 0], logits.max(-1).values)
    assert torch.allclose(state[1, 1], (logits[1] - logits[1].max()).exp().sum(), rtol=1e-4)


def test_ties_at_the_cut_are_all_kept() -> None:
    logits = torch.zeros(1, 600)
    logits[0, :3] = 2.0
    logits[0, 3:13] = 1.0  # ten tokens tied where top-k = 5 cuts
    kept, _ = _search(logits.to(DEVICE), [1.0], [5], [1.0], 2)
    assert kept[0, :13].all() and not kept[0, 13:].any()


def test_min_p_floors_are_on_z_and_greedy_rows_have_none() -> None:
    logits = torch.randn(3, 500)
    temps = [0.5, 0.0, 1.0]
    _, state = _search(logits.to(DEVICE), temps, [0, 0, 0], [1.0, 1.0, 1.0], 2, [0.1, 0.1, 0.0])
    assert torch.allclose(state[0, 2], logits[0].max() / 0.5 + torch.tensor(0.1).log())
    assert state[1, 2] < -1e38 and state[2, 2] < -1e38  # greedy; min-p off

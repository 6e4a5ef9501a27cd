"""Penalties and min_tokens bans of a batch (layers/penalties.py) against their definitions: worked
by hand on one row, and row by row (Python sets and counts, float32 arithmetic) on a random batch
mixing every kind. No model."""

from __future__ import annotations

from collections import Counter

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams
from pdserve.layers.penalties import apply_penalties


def _request(prompt: list[int], outputs: list[int], eos: tuple[int, ...] = (), **params: object) -> Request:
    req = Request("r", prompt, SamplingParams(**params), eos_token_ids=eos)  # type: ignore[arg-type]
    for t in outputs:
        req.append_token(t)
    return req


def test_one_row_worked_by_hand() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    req = _request([0, 1, 1], [3, 3], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(logits, [req])
    # 0: 2 / 2; 1: -2 * 2 (seen twice, penalized once); 2, 4: never seen;
    # 3: 0.5 / 2, then - (0.5 * 2 + 0.25)
    assert logits.tolist() == [[1.0, -4.0, 1.0, -1.0, 3.0]]


def _reference(logits: torch.Tensor, requests: list[Request]) -> None:
    for i, req in enumerate(requests):
        p = req.params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            r = torch.tensor(p.repetition_penalty, dtype=torch.float32)
            for t in set(req.token_ids):
                row[t] = row[t] / r if row[t] > 0 else row[t] * r
        if p.presence_penalty or p.frequency_penalty:
            f = torch.tensor(p.frequency_penalty, dtype=torch.float32)
            pres = torch.tensor(p.presence_penalty, dtype=torch.float32)
            for t, c in Counter(req.output_token_ids).items():
                row[t] = row[t] - (f * torch.tensor(float(c)) + pres)
        if req.num_output_tokens < p.min_tokens:
            for t in list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids)):
                if t < logits.shape[1]:
                    row[t] = float("-inf")


def test_a_mixed_batch_matches_the_definitions_row_by_row() -> None:
    torch.manual_seed(0)
    vocab = 300
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    requests = [
        _request(ids(40), ids(9), repetition_penalty=1.3),
        _request(ids(5), ids(30), presence_penalty=0.7, frequency_penalty=-0.4),
        _request(ids(20), [], repetition_penalty=0.8, frequency_penalty=1.0),  # no outputs yet
        _request(ids(10), ids(3)),  # nothing asked
        _request(ids(10), ids(2), eos=(7,), min_tokens=5, stop_token_ids=[11, 999]),  # 999: past vocab
        _request(ids(10), ids(2), eos=(7,), min_tokens=5, ignore_eos=True, stop_token_ids=[12]),
        _request(ids(10), ids(6), eos=(7,), min_tokens=5, repetition_penalty=1.1),  # min_tokens reached
    ]
    logits = torch.randn(len(requests), vocab)
    want = logits.clone()
    _reference(want, requests)
    apply_penalties(logits, requests)
    assert torch.equal(logits, want)
    assert logits[4, 7] == float("-inf") and logits[4, 11] == float("-inf")
    assert logits[5, 7] != float("-inf") and logits[5, 12] == float("-inf")


def test_outputs_added_after_the_first_call_count_too() -> None:
    """The prompt's distinct tokens are kept between steps; the outputs are read every call."""
    req = _request([1, 2], [], repetition_penalty=2.0)
    first = torch.full((1, 6), 4.0)
    apply_penalties(first, [req])
    assert first.tolist() == [[4.0, 2.0, 2.0, 4.0, 4.0, 4.0]]
    req.append_token(5)
    again = torch.full((1, 6), 4.0)
    apply_penalties(again, [req])
    assert again.tolist() == [[4.0, 2.0, 2.0, 4.0, 4.0, 2.0]]


def test_output_counts_grow_step_by_step() -> None:
    req = _request([1], [2], frequency_penalty=1.0, presence_penalty=0.5)
    logits = torch.zeros(1, 4)
    apply_penalties(logits, [req])
    assert logits.tolist() == [[0.0, 0.0, -1.5, 0.0]]  # 2 once
    req.append_token(2)
    req.append_token(3)
    logits = torch.zeros(1, 4)
    apply_penalties(logits, [req])
    assert logits.tolist() == [[0.0, 0.0, -2.5, -1.5]]  # 2 twice, 3 once; the prompt's 1 never

"""Penalties and min_tokens bans of a batch (engine/penalties.py) against their definitions: worked
by hand on one row, and row by row (Python sets and counts, float32 arithmetic) on a random batch
mixing every kind. No model."""

from __future__ import annotations

from collections import Counter

import torch

from pdserve.engine.penalties import apply_penalties
from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams


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


def test_unseen_tokens_count_as_if_the_host_had_appended_them() -> None:
    """A step launched ahead passes the previous step's tokens as a device tensor: the result must be
    the one the host gets after appending them, for every kind of penalty, a token already seen (in
    the prompt, among the outputs) or new, and min_tokens reached by the unseen token or not."""
    vocab = 50
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    prompts = [ids(12) for _ in range(8)]
    outputs = [ids(5), ids(5), [], ids(4), ids(2), ids(3), ids(6), []]
    unseen = [prompts[0][3], outputs[1][2], 49, outputs[3][0], 5, 6, prompts[6][0], outputs[0][0]]
    kinds = [
        {"repetition_penalty": 1.5},  # unseen: in the prompt
        {"frequency_penalty": 0.75, "presence_penalty": 0.5},  # unseen: among the outputs
        {"frequency_penalty": 1.0, "presence_penalty": 0.25, "repetition_penalty": 0.5},  # no outputs yet
        {"repetition_penalty": 2.0, "frequency_penalty": -0.5},
        {"min_tokens": 3, "stop_token_ids": [9]},  # reached with the unseen token: no bans
        {"min_tokens": 5, "stop_token_ids": [9]},  # still short: bans
        {"presence_penalty": 1.0, "repetition_penalty": 1.25},
        {},  # nothing asked
    ]

    def batch() -> list[Request]:
        return [_request(p, o, eos=(7,), **k) for p, o, k in zip(prompts, outputs, kinds, strict=True)]

    logits = torch.randn(len(prompts), vocab)
    ahead_rows, host_rows = batch(), batch()
    got = logits.clone()
    apply_penalties(got, ahead_rows, torch.tensor(unseen))
    for req, t in zip(host_rows, unseen, strict=True):
        req.append_token(t)
    want, defined = logits.clone(), logits.clone()
    apply_penalties(want, host_rows)
    _reference(defined, host_rows)
    assert torch.equal(got, want) and torch.equal(got, defined)
    assert got[5, 9] == float("-inf") and got[4, 9] != float("-inf")
    assert not torch.equal(got[2], logits[2])  # the unseen token was the only output: still counted

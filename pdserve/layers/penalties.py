"""Repetition, presence and frequency penalties and min_tokens bans of a whole batch of logits, in a
few launches.

Row by row, the torch sampler used to take a set() over the prompt and output, one host-to-device
copy and three kernels per penalty, every step: ~5 launches and ~100 us of host time a row. Here
each request keeps a _History, brought up to date with only the tokens added since the step before
(its distinct tokens, prompt and output, and its output tokens' counts); a step concatenates the
rows' arrays into flat (row, token, value) arrays, copies each once, and one gather and one scatter
per kind of adjustment apply them all. The arithmetic is the torch path's, element by element in
float32: repetition divides a positive logit by the penalty and multiplies a negative one, on every
distinct token of prompt and output; then on each output token logit -= frequency * count +
presence; then EOS and stop ids get -inf while a request has fewer than min_tokens outputs.
"""

from __future__ import annotations

import weakref
from collections import Counter

import numpy as np
import torch

from pdserve.engine.host_tensors import to_device
from pdserve.engine.request import Request

Entries = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows, token ids, a float32 value each


class _History:
    """A request's tokens as the penalties read them, updated a step at a time."""

    def __init__(self) -> None:
        self.counted = 0  # leading token_ids taken in so far
        self.seen: set[int] = set()
        self.distinct = np.empty(0, dtype=np.int64)  # prompt and output, each token once
        self.outputs: Counter[int] = Counter()  # output token -> count, in first-seen order

    def update(self, req: Request) -> _History:
        tokens = req.token_ids
        fresh = [t for t in dict.fromkeys(tokens[self.counted :]) if t not in self.seen]
        if fresh:
            self.seen.update(fresh)
            self.distinct = np.concatenate([self.distinct, np.asarray(fresh, dtype=np.int64)])
        self.outputs.update(tokens[max(self.counted, req.num_prompt_tokens) :])
        self.counted = len(tokens)
        return self


_histories: weakref.WeakKeyDictionary[Request, _History] = weakref.WeakKeyDictionary()


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place on logits [rows, vocab] (float32; row i is requests[i]'s)."""
    rep = _repetition(requests)
    if rep is not None:
        rows, ids, factor = _on_device(rep, logits.device)
        vals = logits[rows, ids]
        logits[rows, ids] = torch.where(vals > 0, vals / factor, vals * factor)
    out = _frequency(requests)
    if out is not None:
        rows, ids, minus = _on_device(out, logits.device)
        logits[rows, ids] = logits[rows, ids] - minus
    bans = _banned(requests, logits.shape[1])
    if bans is not None:
        rows, ids, _ = _on_device(bans, logits.device)
        logits[rows, ids] = float("-inf")


def _repetition(requests: list[Request]) -> Entries | None:
    """Every distinct token of prompt and output of each row that asks, and its penalty."""
    asked = [(i, r) for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    if not asked:
        return None
    ids = [_history(r).distinct for _, r in asked]
    rows, lengths = _rows([i for i, _ in asked], ids)
    penalty = np.asarray([r.params.repetition_penalty for _, r in asked], dtype=np.float32)
    return rows, np.concatenate(ids), np.repeat(penalty, lengths)


def _frequency(requests: list[Request]) -> Entries | None:
    """Each distinct output token of each row that asks, and frequency * count + presence for it
    (float32, two roundings, as the torch path computed it)."""
    asked = [
        (i, r)
        for i, r in enumerate(requests)
        if r.num_output_tokens and (r.params.presence_penalty or r.params.frequency_penalty)
    ]
    if not asked:
        return None
    histories = [_history(r) for _, r in asked]
    ids = [np.fromiter(h.outputs.keys(), dtype=np.int64, count=len(h.outputs)) for h in histories]
    rows, lengths = _rows([i for i, _ in asked], ids)
    counts = np.concatenate(
        [np.fromiter(h.outputs.values(), dtype=np.float32, count=len(h.outputs)) for h in histories]
    )
    freq = np.repeat(np.asarray([r.params.frequency_penalty for _, r in asked], dtype=np.float32), lengths)
    presence = np.repeat(np.asarray([r.params.presence_penalty for _, r in asked], dtype=np.float32), lengths)
    return rows, np.concatenate(ids), (freq * counts + presence).astype(np.float32)


def _banned(requests: list[Request], vocab: int) -> Entries | None:
    """EOS (unless ignored) and stop ids of the rows short of min_tokens outputs (ids past the
    vocabulary can never be drawn: left out)."""
    rows, ids = [], []
    for i, r in enumerate(requests):
        p = r.params
        if r.num_output_tokens < p.min_tokens:
            for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids)):
                if t < vocab:
                    rows.append(i)
                    ids.append(t)
    if not rows:
        return None
    return np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64), np.zeros(len(rows), np.float32)


def _rows(rows: list[int], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each row index repeated once per id of its array, and the arrays' lengths."""
    lengths = np.asarray([len(a) for a in ids], dtype=np.int64)
    return np.repeat(np.asarray(rows, dtype=np.int64), lengths), lengths


def _on_device(entries: Entries, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, ids, values = (to_device(torch.from_numpy(a), device) for a in entries)
    return rows, ids, values


def _history(req: Request) -> _History:
    """The request's _History, brought up to date."""
    history = _histories.get(req)
    if history is None or len(req.token_ids) < history.counted:  # never shrinks in the engine
        history = _histories[req] = _History()
    return history.update(req)

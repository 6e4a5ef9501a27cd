"""Repetition, presence and frequency penalties and min_tokens bans of a whole batch of logits, in a
few launches.

Applied row by row, penalties would cost a set() over the prompt and output, a host-to-device copy
and a few kernels per row and penalty, every step. Instead each request keeps a _History, brought up
to date with only the tokens added since the step before (its distinct tokens, prompt and output,
and its output tokens' counts); a step concatenates the rows' arrays into flat (row, token, value)
arrays, copies each once, and one gather and one scatter per kind of adjustment apply them all. The
arithmetic is the per-row definition's, element by element in float32: repetition divides a
positive logit by the penalty and multiplies a negative one, on every distinct token of prompt and
output; then on each output token logit -= frequency * count + presence; then each logit_bias entry
is added (OpenAI's additive bias: +100 all but forces a token, -100 all but bans it); then EOS and
stop ids get -inf while a request has fewer than min_tokens outputs.

A step launched ahead (engine/ahead.py) samples before the host has the previous step's tokens:
those arrive as a device tensor (`unseen`), and each row's counts take its unseen token on the
device (a repetition penalty unless the token is among the row's distinct ones already, one more
count for presence/frequency, min_tokens reached one token earlier), so such batches need no wait.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.request import Request
from pdserve.host_tensors import to_device

Entries = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows, token ids, a float32 value each


@dataclass
class Repeats:
    """The distinct tokens of the rows asking for a repetition penalty, flat."""

    entries: Entries  # per distinct token: its row, the token, the row's penalty
    asked: np.ndarray  # the asking rows
    penalty: np.ndarray  # per asking row (float32)


@dataclass
class Counts:
    """The output tokens of the rows asking for presence/frequency penalties, flat."""

    rows: np.ndarray  # per entry: its row
    ids: np.ndarray  # per entry: a distinct output token
    counts: np.ndarray  # per entry: how often it was sampled (float32)
    lengths: np.ndarray  # per asking row: its entries
    asked: np.ndarray  # the asking rows
    freq: np.ndarray  # per asking row (float32)
    presence: np.ndarray  # per asking row (float32)


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


def apply_penalties(
    logits: torch.Tensor, requests: list[Request], unseen: torch.Tensor | None = None
) -> None:
    """In place on logits [rows, vocab] (float32; row i is requests[i]'s). unseen: [rows] token ids
    on the logits' device, each row's output token the host has not appended yet (a step launched
    ahead of the one that sampled them, engine/ahead.py): one more output token each, counted on the
    device without a wait."""
    rep = _repetition(requests)
    if rep is not None:
        rows, ids, factor = _on_device(logits.device, *rep.entries)
        vals = logits[rows, ids]
        logits[rows, ids] = torch.where(vals > 0, vals / factor, vals * factor)
        if unseen is not None:
            _repeat_unseen(logits, rep, (rows, ids), unseen)
    out = _frequency(requests, unseen is not None)
    if out is not None:
        _subtract(logits, out, unseen)
    bias = _bias(requests, logits.shape[1])
    if bias is not None:
        rows, ids, values = _on_device(logits.device, *bias)
        logits.index_put_((rows, ids), values, accumulate=True)
    bans = _banned(requests, logits.shape[1], unseen is not None)
    if bans is not None:
        rows, ids, _ = _on_device(logits.device, *bans)
        logits[rows, ids] = float("-inf")


def _repetition(requests: list[Request]) -> Repeats | None:
    """Every distinct token of prompt and output of each row that asks, and its penalty."""
    asked = [(i, r) for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
    if not asked:
        return None
    ids = [_history(r).distinct for _, r in asked]
    asked_rows = np.asarray([i for i, _ in asked], dtype=np.int64)
    rows, lengths = _rows(asked_rows, ids)
    penalty = np.asarray([r.params.repetition_penalty for _, r in asked], dtype=np.float32)
    return Repeats((rows, np.concatenate(ids), np.repeat(penalty, lengths)), asked_rows, penalty)


def _repeat_unseen(
    logits: torch.Tensor, rep: Repeats, seen: tuple[torch.Tensor, torch.Tensor], unseen: torch.Tensor
) -> None:
    """The repetition penalty on each asking row's unseen token, unless it is one of the row's
    distinct tokens `seen` (rep's rows and ids, on the device already), penalized already."""
    rows, ids = seen
    held = _per_row(logits, rows, ids == unseen[rows])
    picked, factor = _on_device(logits.device, rep.asked, rep.penalty)
    token = unseen[picked]
    vals = logits[picked, token]
    penalized = torch.where(vals > 0, vals / factor, vals * factor)
    logits[picked, token] = torch.where(held[picked], vals, penalized)


def _frequency(requests: list[Request], ahead: bool) -> Counts | None:
    """Each distinct output token of each row that asks, its count, and the row's frequency and
    presence penalties (ahead: rows whose only output is the unseen one ask too)."""
    asked = [
        (i, r)
        for i, r in enumerate(requests)
        if (r.num_output_tokens or ahead) and (r.params.presence_penalty or r.params.frequency_penalty)
    ]
    if not asked:
        return None
    histories = [_history(r) for _, r in asked]
    ids = [np.fromiter(h.outputs.keys(), dtype=np.int64, count=len(h.outputs)) for h in histories]
    asked_rows = np.asarray([i for i, _ in asked], dtype=np.int64)
    rows, lengths = _rows(asked_rows, ids)
    counts = np.concatenate(
        [np.fromiter(h.outputs.values(), dtype=np.float32, count=len(h.outputs)) for h in histories]
    )
    freq = np.asarray([r.params.frequency_penalty for _, r in asked], dtype=np.float32)
    presence = np.asarray([r.params.presence_penalty for _, r in asked], dtype=np.float32)
    return Counts(rows, np.concatenate(ids), counts, lengths, asked_rows, freq, presence)


def _subtract(logits: torch.Tensor, out: Counts, unseen: torch.Tensor | None) -> None:
    """logits -= frequency * count + presence on each row's output tokens (float32, two roundings,
    as the per-row definition has them); with `unseen`, each asking row's unseen token counts once more."""
    per_entry = (np.repeat(a, out.lengths) for a in (out.freq, out.presence))
    rows, ids, counts, freq, presence = _on_device(logits.device, out.rows, out.ids, out.counts, *per_entry)
    if unseen is not None:
        again = ids == unseen[rows]
        counts = counts + again.to(torch.float32)
        asked, row_freq, row_presence = _on_device(logits.device, out.asked, out.freq, out.presence)
        token = unseen[asked]
        new = ~_per_row(logits, rows, again)[asked]  # the unseen token is not among the row's outputs
        rows, ids = torch.cat([rows, asked]), torch.cat([ids, token])
        counts = torch.cat([counts, new.to(torch.float32)])
        freq, presence = (
            torch.cat([freq, row_freq]),
            torch.cat([presence, torch.where(new, row_presence, 0.0)]),
        )
    minus = freq * counts + presence  # 0 for an unseen token already counted above: no change
    logits.index_put_((rows, ids), -minus, accumulate=True)


def _bias(requests: list[Request], vocab: int) -> Entries | None:
    """Each row's logit_bias, flat (ids past the vocabulary can never be drawn: left out)."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, r in enumerate(requests):
        for t, v in (r.params.logit_bias or {}).items():
            if t < vocab:
                rows.append(i)
                ids.append(t)
                values.append(v)
    if not rows:
        return None
    return np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64), np.asarray(values, np.float32)


def _banned(requests: list[Request], vocab: int, ahead: bool) -> Entries | None:
    """EOS (unless ignored) and stop ids of the rows short of min_tokens outputs, counting the unseen
    token when ahead (ids past the vocabulary can never be drawn: left out)."""
    rows, ids = [], []
    for i, r in enumerate(requests):
        p = r.params
        if r.num_output_tokens + ahead < p.min_tokens:
            for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids)):
                if t < vocab:
                    rows.append(i)
                    ids.append(t)
    if not rows:
        return None
    return np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64), np.zeros(len(rows), np.float32)


def _per_row(logits: torch.Tensor, rows: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """[logits' rows] bool: whether any of the flags of each row is set."""
    hits = torch.zeros(logits.shape[0], dtype=torch.int32, device=logits.device)
    return hits.index_add_(0, rows, flags.to(torch.int32)) > 0


def _rows(rows: np.ndarray, ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each row index repeated once per id of its array, and the arrays' lengths."""
    lengths = np.asarray([len(a) for a in ids], dtype=np.int64)
    return np.repeat(rows, lengths), lengths


def _on_device(device: torch.device, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The host arrays on `device`, each copied once without waiting for the work queued there."""
    return tuple(to_device(torch.from_numpy(a), device) for a in arrays)


def _history(req: Request) -> _History:
    """The request's _History, brought up to date."""
    history = _histories.get(req)
    if history is None or len(req.token_ids) < history.counted:  # never shrinks in the engine
        history = _histories[req] = _History()
    return history.update(req)

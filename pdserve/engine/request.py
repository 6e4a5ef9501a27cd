"""Request: one sequence's tokens, its progress through the model, its blocks and its status.

The one scheduling rule reads off two numbers: `num_computed_tokens` (KV in the cache) catches up with
`num_tokens` (prompt plus generated). A prompt chunk, a decode step, a recompute after preemption and KV
arriving from a prefill instance all just move `num_computed_tokens`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pdserve.disagg.handoff import HandOff
from pdserve.engine.sampling import SamplingParams
from pdserve.structured.matcher import Matcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved; KV is being written by a prefill instance
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class RequestTimes:
    """When one request reached each stage (time.monotonic(); None: it never did). `scheduled`: first
    given blocks, to compute its prompt or to receive its KV; `kv_ready`: that KV (and its first token)
    arrived; `stopped`: the request ended as it should (stop or length), not aborted or failed."""

    arrival: float
    scheduled: float | None = None
    kv_ready: float | None = None
    first_token: float | None = None
    finished: float | None = None
    stopped: bool = False

    def stages(self) -> dict[str, float]:
        """Seconds spent in each stage the request went through: queue, prefill (computed here),
        kv_transfer (received from a prefill instance), decode (first token to the last)."""
        out: dict[str, float] = {}
        if self.scheduled is None:
            return out
        out["queue"] = self.scheduled - self.arrival
        if self.kv_ready is not None:
            out["kv_transfer"] = self.kv_ready - self.scheduled
        else:  # a prefill for a peer ends, stopped, without a token of its own here
            prompt_done = self.first_token if self.first_token is not None else None
            if prompt_done is None and self.stopped:
                prompt_done = self.finished
            if prompt_done is not None:
                out["prefill"] = prompt_done - self.scheduled
        if self.first_token is not None and self.finished is not None and self.stopped:
            out["decode"] = self.finished - self.first_token
        return out


@dataclass
class Logprob:
    """The sampled token's log-probability and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Request:
    """A sequence in the engine. The engine knows token ids only; text lives in the detokenizer."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        max_model_len: int = 1 << 30,
        handoff: HandOff | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = self.prompt_token_ids + list(output_token_ids)  # outputs: a resumed request's
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.handoff = handoff  # where its prompt KV comes from or goes to (None: local)
        self.times = RequestTimes(time.monotonic())
        self._status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0  # leading blocks already in the prefix cache (block_manager)
        self.logprobs: list[Logprob] = []
        self.num_preemptions = 0
        self.arrival_time = self.times.arrival
        self.first_token_time: float | None = None
        self.error: str | None = None
        self.generator: torch.Generator | None = None
        self.matcher: Matcher | None = None  # its grammar's state, for a structured request (engine.py)
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def status(self) -> RequestStatus:
        return self._status

    @status.setter
    def status(self, status: RequestStatus) -> None:
        """Every change of status goes through here, so the stage times (RequestTimes) are kept."""
        times, now, was = self.times, time.monotonic(), self._status
        if status in (RequestStatus.RUNNING, RequestStatus.WAITING_FOR_KV) and times.scheduled is None:
            times.scheduled = now
        elif status is RequestStatus.RUNNING and was is RequestStatus.WAITING_FOR_KV:
            times.kv_ready = now
        elif status.finished and times.finished is None:
            times.finished = now
            times.stopped = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        self._status = status

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def max_output_tokens(self) -> int:
        room = self.max_model_len - self.num_prompt_tokens
        limit = self.params.max_tokens
        return room if limit is None else min(limit, room)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = self.times.first_token = time.monotonic()

    def check_stop_token(self) -> RequestStatus | None:
        """After a token is appended: has the request hit EOS, a stop token, or its length limit?"""
        last = self.token_ids[-1]
        n_out = self.num_output_tokens
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, computed={self.num_computed_tokens}/"
            f"{self.num_tokens}, blocks={self.block_ids})"
        )

"""One OpenAI request in flight: its n choices, the engine requests behind them, and its usage.

n choices are n engine requests added as one group: choice i is request "<id>-i" (just "<id>" when
n is 1), seeded seed+i when a seed is given. Knows nothing of HTTP or of the answer's JSON shape.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.async_engine import SubRequest
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Logprob
from pdserve.engine.resume import Resume
from pdserve.engine.sampling import SamplingParams
from pdserve.server import protocol as p
from pdserve.server.metrics import RequestTracker

Kind = Literal["chat", "completion"]


@dataclass
class Choice:
    """What one of the n choices has produced so far."""

    index: int
    tracker: RequestTracker
    text: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    text_offset: int = 0  # completions logprobs: characters of token text already reported
    chars_sent: int = 0  # characters of output text streamed so far (a resumed answer's included)

    def add(self, out: RequestOutput) -> None:
        self.tracker.on_output(out)
        self.text.append(out.new_text)
        self.chars_sent += len(out.new_text)
        self.logprobs.extend(out.new_logprobs)
        self.num_output_tokens += len(out.new_token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            self.finish_reason = out.finish_reason


@dataclass
class Generation:
    kind: Kind
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    choices: list[Choice]
    handoff: FromPrefill | None = None  # from the entry: where this request's KV comes from
    created: int = field(default_factory=lambda: int(time.time()))
    resume: p.ResumeParams | None = None  # continue an answer that broke off elsewhere (issue 25)
    resumable: bool = False  # the stream carries id lines (protocol.RESUMABLE_HEADER)

    def __post_init__(self) -> None:
        if self.resume is not None:  # the answer goes on under its first id, counting what it had
            self.created = self.resume.created
            for choice in self.choices:
                choice.num_output_tokens = len(self.resume.output_token_ids)
                choice.chars_sent = self.resume.text_chars_sent

    @property
    def answer_id(self) -> str:
        """The `id` of the answer's chunks: a resumed answer's first id, else this request's."""
        return self.resume.completion_id if self.resume is not None else self.request_id

    def engine_resume(self) -> Resume | None:
        """What the engine continues from; a non-streamed answer repeats the resumed text."""
        r = self.resume
        if r is None:
            return None
        return Resume(tuple(r.output_token_ids), r.text_chars_sent, whole_text=not self.stream)

    def sub_request_id(self, index: int) -> str:
        return self.request_id if self.n == 1 else f"{self.request_id}-{index}"

    def sub_requests(self) -> list[SubRequest]:
        return [
            (
                self.sub_request_id(i),
                self.prompt_token_ids,
                choice_params(self.params, i),
                self.handoff,
                self.engine_resume(),
            )
            for i in range(self.n)
        ]

    def choice_of(self, out: RequestOutput) -> Choice:
        return self.choices[0] if self.n == 1 else self.choices[int(out.request_id.rsplit("-", 1)[1])]

    def usage(self) -> p.Usage:
        completion = sum(c.num_output_tokens for c in self.choices)
        prompt = len(self.prompt_token_ids)
        return p.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=p.PromptTokensDetails(cached_tokens=self.choices[0].num_cached_tokens),
        )


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n: its own request, seeded seed+i when a seed is given."""
    seed = params.seed
    if seed is not None and index:
        seed = (seed + index + 2**63) % 2**64 - 2**63  # stays a valid 64-bit seed
    return dataclasses.replace(params, n=1, seed=seed)

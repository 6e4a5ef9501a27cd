"""One OpenAI request in flight: its choices, the engine requests behind them, and its usage.

A request of P prompts (a /v1/completions batch; 1 otherwise) and n choices each is P * n engine
requests added as one group: choice i (of prompt i // n) is request "<id>-i" (just "<id>" when there is
one), seeded seed + i % n when a seed is given, so each prompt of a batch draws as it would alone.
Knows nothing of HTTP or of the answer's JSON shape.

Disaggregated, only the first choice of each prompt is a hand-off when the prompt is longer than one KV
block (and the decode instance caches prefixes): the prefill instance computes that prompt once, and
the other n - 1 choices are local requests the decode scheduler holds until that KV has arrived, then
serves from its prefix cache (engine/scheduler.py), each computing only the tokens after the prompt's
last full block and drawing its own first token. A shorter prompt has no block to share: each of its
choices is its own hand-off.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.engine_loop import SubRequest
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Logprob
from pdserve.engine.resume import Resume
from pdserve.engine.sampling import SamplingParams
from pdserve.server import protocol as p
from pdserve.server.metrics import RequestTracker
from pdserve.server.parsers.pipeline import ChoiceParser, ParserSpec

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
    parser: ChoiceParser | None = None  # a streamed chat answer's parsers (Generation.parser)
    calls_sent: int = 0  # tool calls streamed so far (the next one's index)

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
    prompts: list[list[int]] = field(default_factory=list)  # a batch's prompts (default: the one)
    budgets: list[int | None] = field(default_factory=list)  # each prompt's max_tokens (default: params')
    echo: list[str] | None = None  # completions' echo: each prompt's text, before its choices' text
    continuous_usage: bool = False  # usage so far on every streamed chunk
    parsing: ParserSpec | None = None  # chat: reasoning / tool-call parsing of each choice's text
    parsed_before: str = ""  # a resumed stream: the text its client has had (primes the parsers)
    shared_prefill_min: int | None = None  # n > 1 hand-off: prompts this long are prefilled once

    def __post_init__(self) -> None:
        if not self.prompts:
            self.prompts = [self.prompt_token_ids]
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
        return self.request_id if len(self.choices) == 1 else f"{self.request_id}-{index}"

    def sub_requests(self) -> list[SubRequest]:
        return [
            (
                self.sub_request_id(i),
                self.prompts[i // self.n],
                choice_params(self._prompt_params(i // self.n), i % self.n),
                self._choice_handoff(i),
                self.engine_resume(),
            )
            for i in range(len(self.choices))
        ]

    def _choice_handoff(self, index: int) -> FromPrefill | None:
        """The hand-off of choice `index`: none for a choice after the first whose prompt is shared."""
        if index % self.n == 0 or self.handoff is None or self.shared_prefill_min is None:
            return self.handoff
        return None if len(self.prompts[index // self.n]) >= self.shared_prefill_min else self.handoff

    def _prompt_params(self, prompt: int) -> SamplingParams:
        if not self.budgets or self.budgets[prompt] == self.params.max_tokens:
            return self.params
        return dataclasses.replace(self.params, max_tokens=self.budgets[prompt])

    def choice_of(self, out: RequestOutput) -> Choice:
        if len(self.choices) == 1:
            return self.choices[0]
        return self.choices[int(out.request_id.rsplit("-", 1)[1])]

    def parser(self) -> ChoiceParser | None:
        """A fresh parser of one choice's text (None: its text is all content)."""
        if self.parsing is None:
            return None
        parser = ChoiceParser(self.parsing)
        if self.parsed_before:
            parser.feed(self.parsed_before)  # what the client has had decides the parsers' state
        return parser

    def usage(self) -> p.Usage:
        completion = sum(c.num_output_tokens for c in self.choices)
        prompt = sum(len(ids) for ids in self.prompts)
        cached = sum(self.choices[k * self.n].num_cached_tokens for k in range(len(self.prompts)))
        return p.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
        )


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n: its own request, seeded seed+i when a seed is given."""
    seed = params.seed
    if seed is not None and index:
        seed = (seed + index + 2**63) % 2**64 - 2**63  # stays a valid 64-bit seed
    return dataclasses.replace(params, n=1, seed=seed)

"""The two answer formats, chat and completion: stream chunks, whole answers, usage, logprobs.

    Format.opening(gen)               chunks sent before any output (chat: the assistant role; none
                                      when the answer is resumed: its client has them already)
    Format.chunks(gen, choice, out)   the chunks one engine output becomes
    Format.usage_chunk(gen)           the last chunk, when stream_options.include_usage
    Format.response(gen)              the whole answer of a request that is not streamed

Pure shaping of pydantic models (protocol.py); running the request and sending bytes is streaming.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Logprob
from pdserve.server import protocol as p
from pdserve.server.generation import Choice, Generation

_MIN_LOGPROB = -9999.0


class TokenText:
    """Each token id's text, decoded once (logprobs name tokens by their text)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_strs: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return s


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)  # -inf is not JSON


class Format:
    """How one kind of endpoint shapes its stream chunks and its whole answer."""

    def __init__(self, token_str: TokenText) -> None:
        self.token_str = token_str

    def opening(self, gen: Generation) -> list[BaseModel]:
        return []

    def chunks(self, gen: Generation, choice: Choice, out: RequestOutput) -> list[BaseModel]:
        raise NotImplementedError

    def usage_chunk(self, gen: Generation) -> BaseModel:
        raise NotImplementedError

    def response(self, gen: Generation) -> BaseModel:
        raise NotImplementedError


class ChatFormat(Format):
    def opening(self, gen: Generation) -> list[BaseModel]:
        if gen.resume is not None:  # the client has had the role chunk from the answer's first part
            return []
        return [
            self._chunk(gen, p.ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}))
            for i in range(gen.n)
        ]

    def chunks(self, gen: Generation, choice: Choice, out: RequestOutput) -> list[BaseModel]:
        result: list[BaseModel] = []
        if out.new_text or out.new_logprobs:
            logprobs = self.logprobs(gen, out.new_logprobs)
            delta = p.ChatChunkChoice(index=choice.index, delta={"content": out.new_text}, logprobs=logprobs)
            result.append(self._chunk(gen, delta))
        if out.finished:
            end = p.ChatChunkChoice(index=choice.index, delta={}, finish_reason=out.finish_reason)
            result.append(self._chunk(gen, end))
        return result

    def _chunk(self, gen: Generation, *choices: p.ChatChunkChoice) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(
            id=gen.answer_id, created=gen.created, model=gen.model, choices=list(choices)
        )

    def usage_chunk(self, gen: Generation) -> BaseModel:
        return p.ChatCompletionChunk(
            id=gen.answer_id, created=gen.created, model=gen.model, choices=[], usage=gen.usage()
        )

    def response(self, gen: Generation) -> BaseModel:
        choices = [
            p.ChatChoice(
                index=c.index,
                message=p.AssistantMessage(content="".join(c.text)),
                logprobs=self.logprobs(gen, c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in gen.choices
        ]
        return p.ChatCompletionResponse(
            id=gen.answer_id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage()
        )

    def logprobs(self, gen: Generation, logprobs: list[Logprob]) -> p.ChatLogprobs | None:
        if gen.params.logprobs is None:
            return None
        k = gen.params.logprobs
        return p.ChatLogprobs(content=[self._entry(lp, k) for lp in logprobs])

    def _entry(self, lp: Logprob, k: int) -> p.ChatTokenLogprob:
        top = [self._top(t, v) for t, v in lp.top[:k]]
        s = self.token_str(lp.token_id)
        return p.ChatTokenLogprob(
            token=s, logprob=_clamp(lp.logprob), bytes=list(s.encode()), top_logprobs=top
        )

    def _top(self, token_id: int, logprob: float) -> p.TopLogprob:
        s = self.token_str(token_id)
        return p.TopLogprob(token=s, logprob=_clamp(logprob), bytes=list(s.encode()))


class CompletionFormat(Format):
    def chunks(self, gen: Generation, choice: Choice, out: RequestOutput) -> list[BaseModel]:
        if not (out.new_text or out.new_logprobs or out.finished):
            return []
        choice_out = p.CompletionChoice(
            index=choice.index,
            text=out.new_text,
            logprobs=self.logprobs(gen, choice, out.new_logprobs),
            finish_reason=out.finish_reason if out.finished else None,
        )
        return [
            p.CompletionResponse(id=gen.answer_id, created=gen.created, model=gen.model, choices=[choice_out])
        ]

    def usage_chunk(self, gen: Generation) -> BaseModel:
        return p.CompletionResponse(
            id=gen.answer_id, created=gen.created, model=gen.model, choices=[], usage=gen.usage()
        )

    def response(self, gen: Generation) -> BaseModel:
        choices = []
        for c in gen.choices:
            c.text_offset = 0
            logprobs = self.logprobs(gen, c, c.logprobs)
            choices.append(
                p.CompletionChoice(
                    index=c.index, text="".join(c.text), logprobs=logprobs, finish_reason=c.finish_reason
                )
            )
        return p.CompletionResponse(
            id=gen.answer_id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage()
        )

    def logprobs(
        self, gen: Generation, choice: Choice, logprobs: list[Logprob]
    ) -> p.CompletionLogprobs | None:
        if gen.params.logprobs is None:
            return None
        k = gen.params.logprobs
        result = p.CompletionLogprobs()
        for lp in logprobs:
            s = self.token_str(lp.token_id)
            top = {self.token_str(t): _clamp(v) for t, v in lp.top[:k]}
            top.setdefault(s, _clamp(lp.logprob))
            result.tokens.append(s)
            result.token_logprobs.append(_clamp(lp.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(choice.text_offset)
            choice.text_offset += len(s)
        return result


def format_of(gen: Generation, token_str: TokenText) -> Format:
    return ChatFormat(token_str) if gen.kind == "chat" else CompletionFormat(token_str)

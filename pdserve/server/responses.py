"""The two answer formats, chat and completion: stream chunks, whole answers, usage, logprobs.

    Format.opening(gen)               chunks sent before any output (chat: the assistant role;
                                      completions: the echoed prompts; none when the answer is
                                      resumed: its client has them already)
    Format.chunks(gen, choice, out)   the chunks one engine output becomes
    Format.usage_chunk(gen)           the last chunk, when stream_options.include_usage
    Format.response(gen)              the whole answer of a request that is not streamed

A chat answer with parsing (Generation.parsing: --reasoning-parser, tools) goes through its choice's
parsers (server/parsers/): streamed, each output's text becomes reasoning_content, content and
tool_calls deltas, as vLLM streams them and the openai SDK assembles them: a call's first delta has
its index, id, type and name (arguments ""), the next ones more of its arguments' text under the same
index; whole, the same parsers read the whole text, and each call's arguments are its pieces joined.
Pure shaping of pydantic models (protocol.py); running the request and sending bytes is streaming.py.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Logprob
from pdserve.server import protocol as p
from pdserve.server.generation import Choice, Generation
from pdserve.server.parsers.tool_calls import CallPiece, ParsedCall

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
            for i in range(len(gen.choices))
        ]

    def chunks(self, gen: Generation, choice: Choice, out: RequestOutput) -> list[BaseModel]:
        result: list[BaseModel] = []
        delta = self._delta(gen, choice, out)
        if delta or out.new_logprobs:
            logprobs = self.logprobs(gen, out.new_logprobs)
            piece = p.ChatChunkChoice(index=choice.index, delta=delta or {"content": ""}, logprobs=logprobs)
            result.append(self._chunk(gen, piece))
        if out.finished:
            reason = _finish_reason(gen, out.finish_reason, choice.calls_sent)
            end = p.ChatChunkChoice(index=choice.index, delta={}, finish_reason=reason)
            result.append(self._chunk(gen, end))
        return result

    def _delta(self, gen: Generation, choice: Choice, out: RequestOutput) -> dict[str, Any]:
        """What this output adds to the choice's message: its text, or what the parsers made of it."""
        if gen.parsing is None:
            return {"content": out.new_text} if out.new_text else {}
        if choice.parser is None:
            choice.parser = gen.parser()
            assert choice.parser is not None
            choice.calls_sent = choice.parser.calls_given  # a resumed stream's client has had these
        assert choice.parser is not None
        parsed = choice.parser.feed(out.new_text)
        if out.finished:
            parsed.add(choice.parser.finish())
        delta: dict[str, Any] = {}
        if parsed.reasoning:
            delta["reasoning_content"] = parsed.reasoning
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.pieces:
            delta["tool_calls"] = _call_deltas(choice, parsed.pieces)
        return delta

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
                message=self._message(gen, "".join(c.text)),
                logprobs=self.logprobs(gen, c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in gen.choices
        ]
        for choice, message in zip(choices, (c.message for c in choices), strict=True):
            choice.finish_reason = _finish_reason(gen, choice.finish_reason, len(message.tool_calls))
        return p.ChatCompletionResponse(
            id=gen.answer_id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage()
        )

    def _message(self, gen: Generation, text: str) -> p.AssistantMessage:
        parser = gen.parser()
        if parser is None:
            return p.AssistantMessage(content=text)
        parsed = parser.whole(text)
        return p.AssistantMessage(
            content=parsed.content or (None if parsed.calls else ""),
            reasoning_content=parsed.reasoning or None,
            tool_calls=[_tool_call(c) for c in parsed.calls],
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
    def opening(self, gen: Generation) -> list[BaseModel]:
        if gen.echo is None or gen.resume is not None:  # a resumed answer's client has had the echo
            return []
        echoed = [p.CompletionChoice(index=c.index, text=self._echo(gen, c)) for c in gen.choices]
        return [p.CompletionResponse(id=gen.answer_id, created=gen.created, model=gen.model, choices=echoed)]

    def _echo(self, gen: Generation, choice: Choice) -> str:
        return "" if gen.echo is None else gen.echo[choice.index // gen.n]

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
                    index=c.index,
                    text=self._echo(gen, c) + "".join(c.text),
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
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


def _call_deltas(choice: Choice, pieces: list[CallPiece]) -> list[dict[str, Any]]:
    """The tool_calls of one delta: a call's start (index, id, type, name), its arguments' text under
    its index; pieces of one call in a row share one entry."""
    deltas: list[dict[str, Any]] = []
    for piece in pieces:
        if piece.name is not None:
            choice.calls_sent += 1
            call = _tool_call(ParsedCall(piece.name, piece.arguments)).model_dump()
            deltas.append({"index": choice.calls_sent - 1, **call})
        elif deltas:
            deltas[-1]["function"]["arguments"] += piece.arguments
        else:  # more of a call begun in an earlier delta
            deltas.append({"index": choice.calls_sent - 1, "function": {"arguments": piece.arguments}})
    return deltas


def _tool_call(call: ParsedCall) -> p.ToolCallOut:
    function = p.FunctionCallOut(name=call.name, arguments=call.arguments)
    return p.ToolCallOut(id=f"chatcmpl-tool-{uuid.uuid4().hex}", function=function)


def _finish_reason(gen: Generation, reason: str | None, num_calls: int) -> str | None:
    """ "tool_calls" for an answer that ended calling tools (auto or required), as OpenAI says it."""
    mode = gen.parsing.tool_mode if gen.parsing is not None else None
    return "tool_calls" if num_calls and reason == "stop" and mode in ("auto", "required") else reason


def format_of(gen: Generation, token_str: TokenText) -> Format:
    return ChatFormat(token_str) if gen.kind == "chat" else CompletionFormat(token_str)

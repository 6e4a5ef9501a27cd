"""Running one Generation on the engine and answering with it: an SSE stream, or one collected answer.

    streamed:     opening chunks, one or more chunks per engine output, [usage chunk], "data: [DONE]"
                  (with the X-PDServe-Resumable: 1 header, the first event of each output that adds
                  tokens carries `id: <chars>:<token ids>`, an id-only event if it has no chunk:
                  what the router needs to resume the answer elsewhere, issue 25 R1)
    not streamed: every choice's outputs gathered, then Format.response as one JSON body

An engine output that ends badly becomes a typed error: an error event inside the stream (headers are
already sent), or an exception for errors.py to answer. However the answer ends (done, client gone,
error), every engine request still running is aborted. Each answer counts one outcome per choice in
the requests counter, except an error that becomes the HTTP answer (a client gone before a whole
answer included): errors.py counts that one, once. Each answer is one OpenTelemetry span
(observability/tracing.py), a child of the request's `traceparent` header; a hand-off passes the span
on to the prefill instance in its Reserve.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from opentelemetry.trace import Span
from pydantic import BaseModel

from pdserve.engine.engine_front import EngineFront, RequestStream
from pdserve.engine.outputs import RequestOutput
from pdserve.errors import (
    EngineDeadError,
    InvalidRequestError,
    PDServeError,
    PrefillDrainingError,
    PrefillFailedError,
)
from pdserve.observability import tracing
from pdserve.server.errors import ClientDisconnectedError, error_body, kind_of
from pdserve.server.generation import Choice, Generation
from pdserve.server.protocol import RESUMABLE_HEADER
from pdserve.server.responses import Format, TokenText, format_of

# engine/engine.py's hand-off error prefixes: the prefill instance found the request wrong (the
# client's 400) or could not deliver its KV (502: the router may retry another prefill)
_HAND_OFF_ERRORS: dict[str, Callable[[str], PDServeError]] = {
    "invalid_request": InvalidRequestError,
    "prefill_failed": PrefillFailedError,
    "prefill_draining": PrefillDrainingError,
}

_FINISHED_OK = ("stop", "length")


class GenerationRunner:
    """Adds a Generation's requests to the engine and turns their outputs into the HTTP answer."""

    def __init__(self, engine: EngineFront) -> None:
        self.engine = engine
        self.token_str = TokenText(engine.tokenizer)

    async def run(self, gen: Generation, raw: Request) -> Response:
        span = tracing.start(
            "decode.request" if gen.handoff else "instance.request", tracing.incoming(raw.headers)
        )
        if gen.handoff is not None:  # the prefill instance's span joins this trace (Reserve.trace_context)
            gen.handoff = replace(gen.handoff, trace_context=tracing.traceparent(span) or "")
        try:
            stream = await self.open(gen, raw)
        except BaseException:
            span.end()
            raise
        fmt = format_of(gen, self.token_str)
        gen.resumable = gen.stream and len(gen.choices) == 1 and raw.headers.get(RESUMABLE_HEADER) == "1"
        if gen.stream:
            return SSEResponse(self.sse(gen, stream, fmt), on_close=lambda: self._close(gen, stream, span))
        try:
            await self.collect(gen, stream, raw)
        finally:
            span.end()
        return Response(fmt.response(gen).model_dump_json(), media_type="application/json")

    async def open(self, gen: Generation, raw: Request) -> RequestStream:
        """Add the generation's requests to the engine (an entry decode instance picks a prefill first)."""
        stream = await self.engine.add(gen.sub_requests())
        gen.choices[0].tracker.added()
        return stream

    async def collect(self, gen: Generation, stream: RequestStream, raw: Request) -> None:
        """Gather every choice's outputs; abort if the client goes away before the answer is ready."""
        task = asyncio.ensure_future(self._consume(gen, stream))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done() and await raw.is_disconnected():
                    raise ClientDisconnectedError("client disconnected")
            task.result()
        except Exception:
            for choice in gen.choices:  # the error becomes the answer: errors.py counts its outcome
                choice.tracker.finish(None)
            raise
        finally:
            task.cancel()
            self._close(gen, stream)

    async def _consume(self, gen: Generation, stream: RequestStream) -> None:
        async for out in stream:
            if _ended_badly(out):
                raise self.failure(out)
            gen.choice_of(out).add(out)

    async def sse(self, gen: Generation, stream: RequestStream, fmt: Format) -> AsyncIterator[str]:
        """The event stream; leaving it early (client gone: cancelled) aborts what is still running."""
        try:
            for chunk in fmt.opening(gen):
                yield _sse(_with_usage(gen, chunk), gen.include_usage)
            async for out in stream:
                if _ended_badly(out):
                    gen.choice_of(out).tracker.finish(out.finish_reason or "error")
                    yield _sse_json(_stream_error(self.failure(out)))
                    break
                choice = gen.choice_of(out)
                choice.add(out)
                chunks = fmt.chunks(gen, choice, out)
                events = [_sse(_with_usage(gen, chunk), gen.include_usage) for chunk in chunks]
                for event in _with_id(events, _id_line(gen, choice, out)):
                    yield event
            else:
                if gen.include_usage:
                    yield _sse(fmt.usage_chunk(gen), True)
            yield "data: [DONE]\n\n"
        finally:
            self._close(gen, stream)

    def _close(self, gen: Generation, stream: RequestStream, span: Span | None = None) -> None:
        stream.abort()
        for choice in gen.choices:
            choice.tracker.finish("abort")  # no-op for choices that finished
        if span is not None:
            span.end()

    def failure(self, out: RequestOutput) -> PDServeError | RuntimeError:
        if self.engine.fatal_error is not None:
            return EngineDeadError(f"the engine stopped: {self.engine.fatal_error}")
        if out.finish_reason == "abort":
            return EngineDeadError("the request was aborted: the server is shutting down")
        kind, _, message = (out.error or "").partition(": ")
        if kind in _HAND_OFF_ERRORS:
            return _HAND_OFF_ERRORS[kind](message)
        return RuntimeError(out.error or "the request failed in the engine")


class SSEResponse(StreamingResponse):
    """An event stream that runs `on_close` however it ends, even if its body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _ended_badly(out: RequestOutput) -> bool:
    return out.finished and out.finish_reason not in _FINISHED_OK


def _sse(chunk: BaseModel, include_usage: bool) -> str:
    exclude = None if include_usage or getattr(chunk, "usage", None) is not None else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def _with_usage(gen: Generation, chunk: BaseModel) -> BaseModel:
    """stream_options.continuous_usage_stats: the usage so far on every chunk."""
    if gen.continuous_usage:
        chunk.usage = gen.usage()  # type: ignore[attr-defined]
    return chunk


def _id_line(gen: Generation, choice: Choice, out: RequestOutput) -> str | None:
    """R1 (issue 25): `<chars>:<ids>`: the output text streamed so far, this event's included, and
    the token ids this output added; None without the header or without new tokens."""
    if not gen.resumable or not out.new_token_ids:
        return None
    return f"{choice.chars_sent}:{','.join(map(str, out.new_token_ids))}"


def _with_id(events: list[str], id_line: str | None) -> list[str]:
    """The events of one output, the first with its id line; an id-only event if there are none
    (its tokens' text is held back)."""
    if id_line is None:
        return events
    if not events:
        return [f"id: {id_line}\n\n"]
    return [f"id: {id_line}\n{events[0]}", *events[1:]]


def _sse_json(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream_error(error: BaseException) -> dict[str, Any]:
    kind = kind_of(error)
    return error_body(str(error), kind)

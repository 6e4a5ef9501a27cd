"""Relaying one upstream stream to the client, event by event, and resuming it when its instance fails.

Events that carry no token yet (the role preamble) are held back until the first one that does, so a
retry before that token stays invisible. After that token, an event is parsed only if it may say
something the relay acts on (sse.needs_parse: an error, usage, a finish_reason, [DONE]). A stream of
one choice is asked for token ids (resume.py): each event's `id:` line is taken off (an event that is
nothing else is not relayed) and kept. When the instance then fails the stream (it breaks off, ends
without [DONE], sends an error event with one of resume.RESUMABLE_CODES, or sends nothing for the
proxy's stall_timeout), the request goes to another pair with `resume` (the ids and characters
delivered, its completion id):

    client ◀── role, "Hel", "lo"  ╳ decode A dies ── same body + resume{ids, 5 chars} ──▶ decode B
           ◀── ", world", ..., usage, [DONE]  ◀──────────────────────────────────────────┘

so the client sees one stream: no error, no text twice, one [DONE], usage as the new instance counts
it (the whole answer). Before any token the request is sent again whole. Each of these spends one of
the request's max_resumes (proxy.py); spent, or with nowhere to go, the stream ends with the error
event and [DONE]. However the response ends, even before it begins, the upstream request is closed
and the instances' counts released.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.router.errors import RouterError, error_body
from pdserve.router.resume import PREFILL_CODES, RESUMABLE_CODES, Progress
from pdserve.router.sse import (
    DONE,
    carries_token,
    error_code,
    event_data,
    json_error_code,
    needs_parse,
    split_id,
    sse_batches,
    sse_event,
)
from pdserve.router.upstream import Answer, UpstreamError

if TYPE_CHECKING:
    from pdserve.router.proxy import Call, Proxy, Route

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """How an attempt failed: its error code, and the error event the client gets if nothing helps."""

    code: str
    event: dict[str, Any]


class Relay:
    """One client stream over one or more upstream attempts."""

    def __init__(self, proxy: Proxy, call: Call, route: Route, response: Answer) -> None:
        self.proxy, self.call = proxy, call
        self.route, self.response = route, response
        self.progress = Progress()
        self.held: list[bytes] = []  # events without a token, not relayed yet
        self.sent = False  # some event has reached the client
        self.committed = False  # an event with a token has reached the client
        self.ended = False  # [DONE] or an error event has reached the client
        self.failure: Failure | None = None
        self.resumed_at: float | None = None  # a resume went out: waiting for its first token
        self.usage: Any = None  # the last `usage` relayed: the answer's output length

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                async for event in self.pump():
                    yield event
                failure, self.failure = self.failure, None
                if failure is None:
                    break
                await self.close()
                end = await self.recover(failure)
                if end is not None:
                    self.ended = True
                    yield end
                    break
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()
            self.proxy.metrics.e2e.observe(time.monotonic() - self.call.arrival)
            self.record_length()
            self.call.span.end()

    async def pump(self) -> AsyncIterator[bytes]:
        """Relay the current attempt, what one upstream read brought as one write (a router that falls
        behind then writes several events at once); a failure is left in `self.failure` for `events`
        to recover."""
        try:
            async with aclosing(self.upstream()) as batches:
                async for batch in batches:
                    out = self.relay_batch(batch)
                    if out:
                        yield out
                    if self.failure is not None:
                        return
        except UpstreamError as e:
            failure = self.proxy.instance_failed(self.route.target, e)
            self.failure = Failure(failure.code, failure.body())
            return
        except TimeoutError:
            message = f"instance {self.route.target.url} sent nothing for {self.proxy.stall_timeout:g}s"
            self.failure = Failure("instance_failed", error_body(message, "server_error", "instance_failed"))
            self.proxy.take_out(self.route.target, "stalled a stream")
            return
        if not self.ended:
            message = f"instance {self.route.target.url} ended the stream early"
            self.failure = Failure("instance_failed", error_body(message, "server_error", "instance_failed"))

    async def upstream(self) -> AsyncGenerator[list[bytes], None]:
        """The attempt's events, those of one read together; once a token is out (and the stream
        resumable), a silence longer than the stall timeout raises TimeoutError."""
        async with aclosing(sse_batches(self.response.aiter_bytes())) as batches:
            while True:
                watched = self.call.resumable and (self.committed or bool(self.progress.token_ids))
                try:
                    batch = await next_within(batches, self.proxy.stall_timeout if watched else None)
                except StopAsyncIteration:
                    return
                yield batch

    def relay_batch(self, batch: list[bytes]) -> bytes:
        """What of these events goes to the client now; an error event another pair may do better on
        ends the batch, left in `self.failure`."""
        out: list[bytes] = []
        for raw in batch:
            event, mark = split_id(raw)
            if mark is not None and self.progress.mark(mark):
                self.first_resumed_token()
            if event is None:
                continue
            if self.committed and not needs_parse(event):  # a plain token: nothing to act on
                out.append(event)
                continue
            data = event_data(event)
            code = error_code(data)
            if code in RESUMABLE_CODES and (self.call.resumable or not self.committed):
                self.failure = Failure(code, data)
                break
            relayed = self.relayed(event, data)
            if relayed is not None:
                out.append(relayed)
        return b"".join(out)

    def relayed(self, event: bytes, data: Any) -> bytes | None:
        """What of `event` goes to the client now (None: held back until a token comes)."""
        self.progress.see(data)  # a held role chunk names the completion too
        if isinstance(data, dict) and data.get("usage"):  # parsed for the relay already: a key lookup
            self.usage = data["usage"]
        if not self.committed:
            if not carries_token(data):
                self.held.append(event)
                return None
            self.commit(data)
        self.ended = self.ended or data == "[DONE]" or error_code(data) is not None
        out = b"".join(self.held) + event
        self.held, self.sent = [], True
        return out

    def commit(self, data: Any) -> None:
        if isinstance(data, dict) and error_code(data) is None and carries_token(data):
            self.committed = True
            self.route.prefill_done()
            self.proxy.metrics.ttft.observe(time.monotonic() - self.call.arrival)
            self.first_resumed_token()

    def record_length(self) -> None:
        """The answer's output tokens for the workload: its usage, else (a finished stream of one
        choice without usage) the token ids its events were marked with."""
        sample = self.call.sample
        if sample is None or sample.generated(self.usage):
            return
        if self.progress.finished and self.progress.token_ids:
            sample.output_tokens = len(self.progress.token_ids)

    def first_resumed_token(self) -> None:
        if self.resumed_at is not None:
            self.proxy.metrics.resume_seconds.observe(time.monotonic() - self.resumed_at)
            self.resumed_at = None

    async def recover(self, failure: Failure) -> bytes | None:
        """Another attempt (resumed, or whole while nothing has reached the client): None once it
        streams, else what ends the client's stream."""
        failed = self.route
        resume = self.call.resumable and self.progress.resumable
        if not resume and self.sent:  # text reached the client, and no resume can follow it
            self.proxy.metrics.count_error(failure.code)
            return self.give_up(failure, resume, "")
        if not self.proxy.may_retry(self.call, failed, failure.code):  # counts the error
            return self.give_up(failure, resume, "no retry left")
        self.call.resume = self.progress.resume_field() if resume else None
        if not resume:  # the next attempt starts the answer again, with its own preamble
            self.held, self.progress = [], Progress()
        try:
            self.route, self.response = await self.proxy.open(self.call)
        except RouterError as e:
            return self.give_up(failure, resume, e.message)
        if self.response.status_code != 200:
            return await self.refused(failure, resume)
        self.log_resume(failure, failed, resume)
        return None

    async def refused(self, failure: Failure, resume: bool) -> bytes | None:
        """The new attempt answered an error: tried again if that may help, else the stream ends."""
        status = self.response.status_code
        content = await self.proxy.read(self.route, self.response)
        code = json_error_code(content)
        if status >= 500 and code in RESUMABLE_CODES:
            return await self.recover(Failure(code, json.loads(content)))
        self.proxy.metrics.count_error(f"upstream_{code or status}")
        if resume:
            self.proxy.metrics.resumes.labels(outcome="failed").inc()
        if code is None:
            message = f"{failure.event['error'].get('message')}; its resume answered HTTP {status}"
            return sse_event(error_body(message, "server_error", failure.code)) + DONE
        return sse_event(json.loads(content)) + DONE

    def give_up(self, failure: Failure, resume: bool, why: str) -> bytes:
        if resume:
            self.proxy.metrics.resumes.labels(outcome="failed").inc()
            logger.warning(
                "request %s: %s failed it (%s) after %d tokens; not resumed: %s",
                self.progress.completion_id,
                self.route.describe(),
                failure.code,
                len(self.progress.token_ids),
                why,
            )
        event = failure.event
        if why and isinstance(event.get("error"), dict):
            event = {"error": {**event["error"], "message": f"{event['error'].get('message')} ({why})"}}
        return sse_event(event) + DONE

    def log_resume(self, failure: Failure, failed: Route, resume: bool) -> None:
        if not resume:
            return
        self.proxy.metrics.resumes.labels(outcome="resumed").inc()
        self.resumed_at = time.monotonic()
        logger.warning(
            "request %s: %s on %s after %d tokens (%d characters); resumed on %s (resume %d of %d)",
            self.progress.completion_id,
            failure.code,
            failed.target.url if failure.code not in PREFILL_CODES else failed.describe(),
            len(self.progress.token_ids),
            self.progress.chars,
            self.route.describe(),
            self.call.tries.spent,
            self.proxy.max_resumes,
        )

    async def close(self) -> None:
        self.route.release()
        await self.response.aclose()


T = TypeVar("T")
_asyncio_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


async def next_within(items: AsyncIterator[T], seconds: float | None) -> T:
    """The next item; TimeoutError after `seconds` without one (None: no limit). asyncio's timeout
    where there is one: it is paid on every relayed event, and costs a third of anyio.fail_after's."""
    if seconds is None:
        return await anext(items)
    if _asyncio_timeout is not None:
        async with _asyncio_timeout(seconds):
            return await anext(items)
    with anyio.fail_after(seconds):
        return await anext(items)


class SSEResponse(StreamingResponse):
    """The relay's event stream; the relay is closed however the response ends, even if it never began."""

    body_iterator: AsyncIterator[bytes]

    def __init__(self, relay: Relay) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(relay.events(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.relay.close()

"""A decode instance as the entry (FastDeploy's way: `--prefill URL...`): a client request that comes
without kv_transfer_params is served disaggregated by this instance itself, no router in front.

    client ──▶ DECODE (this) ── picks a healthy prefill peer, least loaded (router/policies.py) ──┐
                 │ engine request with FromPrefill(its kv_addr, its URL): what a router would name │
                 │ ── Reserve ──▶ PREFILL ── KV + first token ──▶ decode steps ──▶ client ◀─────────┘

The hand-off never leaves this process, so nothing is signed. A hand-off that fails before the first
token ("prefill_failed": the prefill instance refused it, or died while computing the prompt or
sending its KV, which this instance notices within its peer timeout, 5 s, its blocks freed) is
tried again on another healthy prefill instance (up to --max-resumes times), under a new request id,
as the router does; after that the client sees the failure (502, or an SSE error event). A request
that brings kv_transfer_params (a router in front) goes where they say. No healthy prefill peer: 503.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import Request
from pydantic import ValidationError

from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.engine_front import EngineFront, RequestStream
from pdserve.engine.outputs import RequestOutput
from pdserve.router.errors import unavailable
from pdserve.router.instances import Instance
from pdserve.router.policies import LeastLoaded
from pdserve.server.errors import ClientDisconnectedError
from pdserve.server.generation import Generation
from pdserve.server.peers import Peers
from pdserve.server.protocol import KVTransferParams
from pdserve.server.streaming import GenerationRunner

logger = logging.getLogger(__name__)

_DISCONNECT_CHECK_S = 1.0


class DecodeEntryRunner(GenerationRunner):
    """A GenerationRunner whose requests without a hand-off get one: a prefill peer chosen here."""

    def __init__(self, engine: EngineFront, prefills: Peers, max_retries: int = 2) -> None:
        super().__init__(engine)
        self.prefills = prefills
        self.max_retries = max_retries  # --max-resumes
        self.policy = LeastLoaded()

    async def open(self, gen: Generation, raw: Request) -> RequestStream:
        if gen.handoff is not None:  # a router named the prefill instance
            return await super().open(gen, raw)
        tried: list[str] = []
        while True:
            prefill, handoff = self.choose(tried)
            stream, first = await self.attempt(gen, prefill, handoff, raw)
            if not _prefill_failed(first) or not self.may_retry(prefill, tried):
                return Peeked(self.engine, stream, first)
            stream.abort()
            gen.request_id = f"{gen.request_id.split('-', 1)[0]}-{uuid.uuid4().hex}"

    def choose(self, tried: list[str]) -> tuple[Instance, FromPrefill]:
        """A healthy prefill peer not tried yet, and the hand-off naming it; 503 if there is none."""
        while candidates := self.prefills.healthy(tried):
            prefill = self.policy.choose(candidates, "prefill")
            handoff = _handoff(prefill)
            if handoff is not None:
                return prefill, handoff
            prefill.mark_down(f"reports a kv_addr that is no tcp://HOST:PORT: {prefill.kv_addr!r:.80}")
        raise unavailable(self.prefills.why_none())

    async def attempt(
        self, gen: Generation, prefill: Instance, handoff: FromPrefill, raw: Request
    ) -> tuple[RequestStream, RequestOutput]:
        """Add the requests with `handoff` (from `prefill`); wait for their first output (the prompt
        done, or the hand-off failed), so that a failure can still be retried unseen."""
        gen.handoff = handoff
        tokens = len(gen.prompt_token_ids)
        prefill.begin(tokens)
        try:
            stream = await self.engine.add(gen.sub_requests())
            gen.choices[0].tracker.added()
            try:
                return stream, await _first_output(stream, raw)
            except BaseException:
                stream.abort()
                raise
        finally:
            prefill.end(tokens)

    def may_retry(self, prefill: Instance, tried: list[str]) -> bool:
        """After prefill_failed: another prefill instance may try, up to max_retries times."""
        self.prefills.poller.check_soon(prefill)
        tried.append(prefill.url)
        if len(tried) > self.max_retries or not self.prefills.healthy(tried):
            return False
        logger.warning("prefill on %s failed; retrying on another prefill instance", prefill.url)
        return True


async def _first_output(stream: RequestStream, raw: Request) -> RequestOutput:
    """The stream's first output; ClientDisconnectedError if the client leaves before it."""
    first = asyncio.ensure_future(anext(stream))
    try:
        while True:
            done, _ = await asyncio.wait({first}, timeout=_DISCONNECT_CHECK_S)
            if done:
                return first.result()
            if await raw.is_disconnected():
                raise ClientDisconnectedError("client disconnected")
    finally:
        first.cancel()


def _handoff(prefill: Instance) -> FromPrefill | None:
    """The hand-off naming `prefill`, its kv_addr checked as a router's kv_transfer_params are (a peer's
    /pd/info is input too); None if it does not pass."""
    fields = {"prefill_kv_addr": prefill.kv_addr, "prefill_url": prefill.url}
    try:
        return KVTransferParams.model_validate(fields).handoff()
    except ValidationError:
        return None


def _prefill_failed(out: RequestOutput) -> bool:
    return out.finished and (out.error or "").startswith(("prefill_failed", "prefill_draining"))


class Peeked(RequestStream):
    """A stream whose first output was read already: it comes first, then the rest of `inner`."""

    def __init__(self, engine: EngineFront, inner: RequestStream, first: RequestOutput) -> None:
        super().__init__(engine, inner.request_ids, asyncio.Queue())
        self.inner: RequestStream = inner
        self.first: RequestOutput | None = first

    @property
    def finished(self) -> bool:
        return self.first is None and self.inner.finished

    async def __anext__(self) -> RequestOutput:
        if self.first is not None:
            out, self.first = self.first, None
            return out
        return await self.inner.__anext__()

    def abort(self) -> None:
        self.inner.abort()

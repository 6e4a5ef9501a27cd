"""This instance as the entry of a disaggregated cluster, with no router in front: which kind of entry
its role and peers make it, the lifetime of its peer polling, GET /pd/peers, and the answers the entry
gives itself.

    --role decode  --prefill URL...   DecodeEntryRunner (entry_decode.py): picks a prefill peer itself
    --role prefill --decode URL...    PrefillRelay (entry_relay.py): hands the request to a decode peer
    anything else                     no entry: the instance serves as before (a request without
                                      kv_transfer_params runs on this instance alone; role both: colocated)

GET /pd/peers lists the peers as this instance sees them (health, role, kv_addr, load), as the router's
/router/instances does. The entry's own refusals (no healthy peer: 503 no_instance; every decode peer
over --decode-max-queued: 503 overloaded; a peer that breaks off: 502/504) are router/errors.py's
RouterError, in OpenAI's shape, counted in pdserve_requests_total by their code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.config import ServerConfig
from pdserve.engine.engine_front import EngineFront
from pdserve.http_edge.auth import bearer_header
from pdserve.router.errors import RouterError
from pdserve.server.entry_decode import DecodeEntryRunner
from pdserve.server.entry_relay import PrefillRelay
from pdserve.server.metrics import ServerMetrics
from pdserve.server.peers import Peers, StaticPeers


@dataclass
class Entry:
    """The peers this instance hands requests to, and how: `runner` (decode) or `relay` (prefill)."""

    peers: Peers
    runner: DecodeEntryRunner | None = None
    relay: PrefillRelay | None = None

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.peers.start()
        try:
            yield
        finally:
            await self.peers.stop()

    def routes(self) -> APIRouter:
        router = APIRouter()

        @router.get("/pd/peers")
        async def peers() -> Response:
            return JSONResponse({"role": self.peers.role, "peers": self.peers.describe()})

        return router

    def install(self, app: FastAPI, metrics: ServerMetrics) -> None:
        """Answer the entry's RouterErrors in OpenAI's shape, counted by their code; a prefill entry's
        relays are counted in this instance's /metrics, under the router's names."""
        if self.relay is not None:
            metrics.registry.register(self.relay.metrics.registry)

        async def entry_error(_: Request, exc: Exception) -> Response:
            assert isinstance(exc, RouterError)
            metrics.count(exc.code)
            return exc.response()

        app.add_exception_handler(RouterError, entry_error)


def make_entry(engine: EngineFront, config: ServerConfig) -> Entry | None:
    """The entry this instance is, given its role and peers (config checked the pairing), or None."""
    headers = bearer_header(config.api_key)  # the peers want the key this instance wants
    if config.prefill_peers and engine.role == "decode":
        prefills = Peers("prefill", StaticPeers(config.prefill_peers), headers)
        return Entry(prefills, runner=DecodeEntryRunner(engine, prefills, config.max_resumes))
    if config.decode_peers and engine.role == "prefill" and engine.kv_addr is not None:
        decodes = Peers("decode", StaticPeers(config.decode_peers), headers)
        url = f"http://{config.host}:{config.port}"
        secret = config.engine.disagg.cluster_secret
        relay = PrefillRelay(url, engine.kv_addr, decodes, secret, config)
        return Entry(decodes, relay=relay)
    return None

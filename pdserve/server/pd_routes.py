"""The endpoints a disaggregated deployment asks of an instance: /pd/info (router, peers) and /debug/kv.

    GET /pd/info    {"role", "model", "kv_addr", "load"}: never waits for the engine thread; "model" is
                    the name clients use (--served-model-name, else the engine's), as the registry has it
    GET /debug/kv   {"num_blocks", "num_free_blocks", "pool_free"}: is the KV pool back to fully free

The KV hand-off itself (kv_transfer_params in a completion request) rides in the OpenAI routes.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from pdserve.engine.engine_front import EngineFront


def pd_router(engine: EngineFront, model: str) -> APIRouter:
    router = APIRouter()

    @router.get("/pd/info")
    async def pd_info() -> Response:
        """Role, KV/control address and load: what the router and peers need to know. Never waits
        for the engine thread (a long prefill step must not look like a dead instance)."""
        load = dict(engine.load)
        body = {"role": engine.role, "model": model, "kv_addr": engine.kv_addr, "load": load}
        return JSONResponse(body)

    @router.get("/debug/kv")
    async def debug_kv() -> Response:
        stats = await engine.stats()
        pool_free = await engine.check_pool_free()
        body = {
            "num_blocks": stats.num_blocks,
            "num_free_blocks": stats.num_free_blocks,
            "pool_free": pool_free,
        }
        return JSONResponse(body)

    return router

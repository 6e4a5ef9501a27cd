"""The API key: `Authorization: Bearer KEY` on every route but /health (and /metrics, if public).

Each app raises its own typed error for a refusal (mapped to 401 where its errors are mapped); the
check itself, and the header the router sends its instances, live here.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

REFUSAL = "a valid API key is required: Authorization: Bearer <key>"
# FastAPI's arguments that turn the API docs off: with a key, /docs and /redoc could not send it (a
# browser asks for /openapi.json without it), and the schema is no one else's business
API_DOCS_OFF: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None}


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def bearer_header(api_key: str | None) -> dict[str, str]:
    """The header that carries `api_key` (none without a key)."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def require_api_key(
    api_key: str | None, refuse: Callable[[], Exception]
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: raises refuse() unless the request carries the key (no key: all pass)."""

    async def check(request: Request) -> None:
        if api_key is not None and not bearer_matches(request.headers.get("authorization"), api_key):
            raise refuse()

    return check

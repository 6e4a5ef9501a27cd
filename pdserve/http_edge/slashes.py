"""A trailing slash names the same route: POST /v1/chat/completions/ is POST /v1/chat/completions.

Starlette would answer 307 (a redirect many clients do not follow for a POST); rewriting the path before
routing serves the route instead, and an unknown path still gets the app's OpenAI-shaped 404.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class TrailingSlash:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)

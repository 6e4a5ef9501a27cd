"""The answers the router gives itself, as OpenAI-shaped errors: {"error": {message, type, param, code}}.

A `RouterError` raised anywhere in a request becomes its HTTP answer (app.py's handler), or, once a stream
has begun, an SSE error event (relay.py); its `code` is also its kind in the errors counter.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class RouterError(Exception):
    """An answer the router gives itself; `code` is also its kind in the errors counter."""

    def __init__(self, status: int, message: str, code: str, type_: str = "server_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def unavailable(message: str) -> RouterError:
    return RouterError(503, message, "no_instance", "service_unavailable_error")

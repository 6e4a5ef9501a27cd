"""The one place where errors become HTTP answers, all in OpenAI's shape.

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Typed pdserve errors map to a status by class; FastAPI's validation errors (never 422 here), unknown
routes, wrong methods and anything unexpected map too, so no answer ever leaves in another shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.cluster_secret import HandoffRefused
from pdserve.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PDServeError,
    PrefillDrainingError,
    PrefillFailedError,
)

logger = logging.getLogger(__name__)


class AuthenticationError(PDServeError):
    """Missing or wrong API key: HTTP 401."""


class InstanceDrainingError(PDServeError):
    """This instance is draining (SIGTERM): no new request, and those past --drain-timeout end. HTTP 503."""


class ClientDisconnectedError(PDServeError):
    """The client went away before its answer was ready (nobody reads the 499)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None
    outcome: str  # the label of the requests counter


INVALID = ErrorKind(400, "invalid_request_error", None, "invalid_request")
_KINDS: list[tuple[type[Exception], ErrorKind]] = [
    (InvalidRequestError, INVALID),
    (ModelNotFoundError, ErrorKind(404, "invalid_request_error", "model_not_found", "model_not_found")),
    (AuthenticationError, ErrorKind(401, "authentication_error", "invalid_api_key", "unauthorized")),
    # hand-off fields this cluster did not sign (a client posing as the router): HTTP 403
    (HandoffRefused, ErrorKind(403, "permission_error", "invalid_handoff_signature", "forbidden")),
    (OverloadedError, ErrorKind(503, "service_unavailable_error", "overloaded", "overloaded")),
    (EngineDeadError, ErrorKind(503, "service_unavailable_error", "engine_dead", "engine_dead")),
    (
        InstanceDrainingError,
        ErrorKind(503, "service_unavailable_error", "instance_draining", "instance_draining"),
    ),
    (
        PrefillDrainingError,
        ErrorKind(503, "service_unavailable_error", "prefill_draining", "prefill_draining"),
    ),
    (PrefillFailedError, ErrorKind(502, "server_error", "prefill_failed", "prefill_failed")),
    (ClientDisconnectedError, ErrorKind(499, "invalid_request_error", "client_disconnected", "abort")),
]
INTERNAL = ErrorKind(500, "server_error", "internal_error", "error")


def kind_of(error: BaseException) -> ErrorKind:
    for cls, kind in _KINDS:
        if isinstance(error, cls):
            return kind
    return INTERNAL


def error_body(message: str, kind: ErrorKind, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_response(error: BaseException) -> JSONResponse:
    """The HTTP answer for `error`; stream handlers use `error_body` for their last event instead."""
    kind = kind_of(error)
    if kind is INTERNAL:
        logger.error("internal error", exc_info=error)
        message = "internal server error"
    else:
        message = str(error) or type(error).__name__
    return JSONResponse(error_body(message, kind, getattr(error, "param", None)), status_code=kind.status)


def validation_error(error: ValidationError | RequestValidationError) -> InvalidRequestError:
    """Turn pydantic's error list into one InvalidRequestError naming the first offending field."""
    errors = error.errors()
    if not errors:
        return InvalidRequestError("invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"request body is not valid JSON: {first.get('msg', '')}")
    where = ".".join(loc)
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg"))
    return InvalidRequestError(message, param=loc[0] if loc else None)


def install_error_handlers(app: FastAPI, on_error: Callable[[ErrorKind], None]) -> None:
    """Register the handlers; `on_error` sees every request error (for the metrics counter)."""

    async def typed(_: Request, exc: Exception) -> JSONResponse:
        on_error(kind_of(exc))
        return error_response(exc)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        on_error(INVALID)
        return error_response(validation_error(exc))

    async def http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = ErrorKind(exc.status_code, "invalid_request_error", code, "invalid_request")
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(PDServeError, typed)
    app.add_exception_handler(HandoffRefused, typed)  # a ValueError, not a PDServeError: its own entry
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, typed)

"""Typed errors raised inside pdserve; the server maps each to one HTTP status in one place."""


class PDServeError(Exception):
    """Base of every error pdserve raises on purpose."""


class InvalidRequestError(PDServeError, ValueError):
    """The request itself is wrong (bad value, prompt too long): the client's fault, HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(PDServeError):
    """The request names a model this server does not serve: HTTP 404."""


class OverloadedError(PDServeError):
    """The server's bounded queue is full: HTTP 503, the client may retry later."""


class PrefillFailedError(PDServeError):
    """The prefill instance could not deliver this request's KV: HTTP 502; the router may retry."""


class PrefillDrainingError(PrefillFailedError):
    """The prefill instance is draining and took no part of this request: HTTP 503; the router
    sends it to another prefill instance without counting a retry."""


class EngineDeadError(PDServeError):
    """The engine loop has stopped and cannot serve: HTTP 503. The server then exits with
    EXIT_STATUS, so that its supervisor (`pdserve up`, Kubernetes) restarts it."""

    EXIT_STATUS = 3  # 1: an uncaught error, 2: a bad configuration

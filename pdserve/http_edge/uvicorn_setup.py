"""The uvicorn server of an instance or of the router: its HTTP protocol, keep-alive, the access log.

Both fronts run uvicorn's httptools protocol (llhttp, a C parser: a streaming front writes every SSE
chunk through it) as OpenAIShapedHttpTools; h11 (pure Python, OpenAIShapedH11) only where httptools is
not importable. Either answers malformed HTTP in OpenAI's error shape (431 for a request head over
MAX_REQUEST_HEAD_BYTES, 400 otherwise) and closes with a linger (refusal.py).
"""

from __future__ import annotations

from typing import Any

import uvicorn

from pdserve.http_edge.access_log import quiet_polls
from pdserve.http_edge.h11_front import OpenAIShapedH11
from pdserve.http_edge.limits import MAX_REQUEST_HEAD_BYTES, SERVER_KEEP_ALIVE_S
from pdserve.http_edge.refusal import LINGER_S

try:
    from pdserve.http_edge.httptools_front import OpenAIShapedHttpTools

    HTTP_PROTOCOL: type = OpenAIShapedHttpTools
except ImportError:  # httptools not installed: the pure-Python parser answers the same
    HTTP_PROTOCOL = OpenAIShapedH11

GRACEFUL_SHUTDOWN_S = 5
__all__ = ["GRACEFUL_SHUTDOWN_S", "HTTP_PROTOCOL", "LINGER_S", "uvicorn_config"]


def uvicorn_config(
    app: Any, host: str, port: int, log_level: str, access_log: bool = True, log_polls: bool = False
) -> Any:
    """The uvicorn.Config both fronts use (HTTP_PROTOCOL whatever else is installed, so malformed HTTP
    is answered in one shape)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        http=HTTP_PROTOCOL,
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,  # both protocols' head limit
        timeout_keep_alive=SERVER_KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    quiet_polls(not log_polls)  # after Config(), which sets up uvicorn's loggers
    return config

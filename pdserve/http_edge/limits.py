"""The limits every request meets at the HTTP edge, and the server side of keep-alive."""

from __future__ import annotations

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: a long prompt is a few hundred KB of JSON
DEFAULT_MAX_CHAT_MESSAGES = 1024
# How long a server (instance or router) keeps an idle keep-alive connection open. A client must give up
# on an idle connection before that (the router's httpx client: a few seconds), or it may send a request
# on a connection the server is closing and read a ReadError from a healthy instance.
SERVER_KEEP_ALIVE_S = 30
# A request head (request line and headers) over this is refused with 431: h11's default, kept for both
# uvicorn protocols (uvicorn's httptools protocol has no limit of its own).
MAX_REQUEST_HEAD_BYTES = 16 * 1024

"""OpenAI's error body, for the answers the edge gives before (or outside) an app's error handlers.

{"error": {"message": str, "type": str, "param": null, "code": str | null}}
"""

from __future__ import annotations

import json


def error_json(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def raw_response(status: int, reason: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection (the request was not, or not all, read)."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body

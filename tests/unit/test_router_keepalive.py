"""The keep-alive race (issue 29, item 5): a real `pdserve router` in front of a small real HTTP server
that closes a kept-alive connection the moment the router sends its next request on it, unanswered:
what an instance whose keep-alive timeout ends just as the router reuses an idle connection does.
Such closes alternate between a FIN (the router sees RemoteProtocolError) and an RST (ReadError). The
router must retry each such request once on a new connection, answer every client request, and keep
the instance in the rotation: neither a proxied request nor a health poll that meets a closed
connection may take it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import Proc, free_port, metric, wait_until

_LOAD = {"num_running": 0, "num_waiting": 0, "num_free_blocks": 8, "num_blocks": 8, "num_waiting_for_kv": 0}


@dataclass
class Request:
    method: str
    path: str
    body: bytes


@dataclass
class ClosingInstance:
    """A colocated instance over raw HTTP/1.1: answers the first request of every connection (keeping
    it alive), reads the next one in full, then closes the connection without answering."""

    port: int = field(default_factory=free_port)
    closed_on_reuse: list[tuple[str, str]] = field(default_factory=list)  # (path, "fin" | "rst")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await read_request(reader)
            if first is not None:
                writer.write(answer(first))
                await writer.drain()
                second = await read_request(reader)  # read in full: a close with unread bytes is an RST
                if second is not None:
                    kind = "rst" if len(self.closed_on_reuse) % 2 else "fin"
                    self.closed_on_reuse.append((second.path, kind))
                    if kind == "rst":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request (None at the end of the connection)."""
    line = await reader.readline()
    if not line.strip():
        return None
    method, path, _ = line.decode().split(" ", 2)
    length = 0
    while (header := await reader.readline()).strip():
        name, _, value = header.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return Request(method, path, await reader.readexactly(length))


def answer(request: Request) -> bytes:
    status, kind, body = "200 OK", "application/json", b""
    if request.path == "/health":
        body = b'{"status": "ok"}'
    elif request.path == "/pd/info":
        body = json.dumps({"role": "both", "model": "fake", "kv_addr": None, "load": _LOAD}).encode()
    elif request.path == "/v1/completions" and json.loads(request.body).get("stream"):
        kind = "text/event-stream"
        event = {"choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}]}
        body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    elif request.path == "/v1/completions":
        body = json.dumps({"choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}]}).encode()
    else:
        status, body = "404 Not Found", b'{"error": {"message": "no", "type": "x", "code": "not_found"}}'
    head = f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


@contextlib.contextmanager
def serving(instance: ClosingInstance) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        server = loop.run_until_complete(asyncio.start_server(instance.handle, "127.0.0.1", instance.port))
        started.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def closing_instance() -> Iterator[ClosingInstance]:
    instance = ClosingInstance()
    with serving(instance):
        yield instance


def instance_state(router_url: str) -> dict[str, Any] | None:
    """The router's view of its one instance (None while the router does not answer)."""
    try:
        return dict(httpx.get(f"{router_url}/router/instances", timeout=2).json()["instances"][0])
    except httpx.HTTPError:
        return None


def test_stale_keepalive_connection_is_retried_and_the_instance_kept(
    closing_instance: ClosingInstance, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--health-interval", "0.2"]
    router = Proc([*cmd, "--instance", f"http://127.0.0.1:{closing_instance.port}"], tmp_path / "r.log")
    router.start()
    try:
        assert wait_until(lambda: not router.alive or instance_state(url) is not None, 30), router.log()
        in_rotation = wait_until(lambda: (instance_state(url) or {}).get("healthy") is True, 5)
        assert in_rotation, f"the instance never entered the rotation: {instance_state(url)}"
        answers = []
        with httpx.Client(timeout=10) as client:
            for i in range(12):
                body = {"model": "fake", "prompt": "Hi", "stream": i % 2 == 1}
                answers.append(client.post(f"{url}/v1/completions", json=body))
        assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
        assert all("hello" in a.text for a in answers)
        assert all(a.text.endswith("data: [DONE]\n\n") for a in answers[1::2])
        assert wait_until(lambda: len(closing_instance.closed_on_reuse) >= 16, 5)  # a few health polls
        stats = instance_state(url)
        retries = metric(httpx.get(f"{url}/metrics", timeout=5).text, "pdserve_router_retries_total")
    finally:
        router.stop()
    closed = closing_instance.closed_on_reuse
    # the race was met on both kinds of close, by proxied requests and by health polls
    assert {kind for _, kind in closed} == {"fin", "rst"}, closed
    assert {"/v1/completions", "/pd/info"} <= {path for path, _ in closed}, closed
    assert stats is not None and stats["healthy"] and stats["reason"] == "ok", stats
    assert "leaves the rotation" not in router.log(100_000)
    assert retries >= 16, retries  # each a retry on a new connection, counted as reason="stale_connection"

"""The HTTP edge of an instance and of the router, over real sockets: the API key on every route but
/health, body-size and message limits that never hold up /health, OpenAI-shaped answers to malformed
HTTP (oversized headers, a trailing slash), a keep-alive longer than the router's, a quiet access log.

One keyed instance (the shared `server` fixture) and one keyed router in front of it (no model of its
own) serve every test here. Raw sockets send what an HTTP client would refuse to (a 300 KB header, a body
that claims 300 MB, a chunked body that never ends) and stop sending as soon as the server answers.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import API_KEY, MODEL, ServerProcess
from tests.e2e.cluster import Proc, free_port, wait_until

KEY = {"Authorization": f"Bearer {API_KEY}"}
MB = 1 << 20


@dataclass
class KeyedRouter:
    proc: Proc
    url: str


@pytest.fixture(scope="module")
def router(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedRouter]:
    """`pdserve router --api-key` in front of the keyed `server`: healthy only if its own calls to the
    instance (/pd/info polls) carry the key."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--port", str(port), "--api-key", API_KEY]
    cmd += ["--health-interval", "0.5", "--instance", server.url]
    proc = Proc(cmd, tmp_path_factory.mktemp("edge") / "router.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        ok = wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60)
        assert ok, f"router not healthy:\n{proc.log()}"
        yield KeyedRouter(proc, url)
    finally:
        proc.stop()


def assert_openai_error(answer: httpx.Response | tuple[int, bytes], status: int | set[int]) -> dict:
    code, body = (answer.status_code, answer.content) if isinstance(answer, httpx.Response) else answer
    assert code in ({status} if isinstance(status, int) else status), (code, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return dict(error)


# ---- raw HTTP -------------------------------------------------------------------------------------------


def raw_exchange(
    url: str, head: bytes, body: Iterable[bytes] = (), timeout: float = 15.0
) -> tuple[int, bytes]:
    """Send `head` (in pieces) then `body` until the server starts answering; its status and body."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        pieces = (head[i : i + 16384] for i in range(0, len(head), 16384))
        for chunk in itertools.chain(pieces, body):
            if select.select([sock], [], [], 0)[0]:
                break  # it answered (or closed) before the body was all sent
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full answer: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- the API key ----------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health(server: ServerProcess, router: KeyedRouter) -> None:
    instance_paths = ["/v1/models", "/pd/info", "/debug/kv", "/metrics", "/openapi.json", "/docs", "/redoc"]
    router_paths = ["/v1/models", "/router/instances", "/metrics", "/openapi.json", "/docs", "/redoc"]
    for base, paths in ((server.url, instance_paths), (router.url, router_paths)):
        for path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                answer = httpx.get(f"{base}{path}", headers=headers, timeout=10)
                assert_openai_error(
                    answer, {401, 404} if path in ("/docs", "/redoc", "/openapi.json") else 401
                )
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/pd/info", "/debug/kv", "/metrics"):
        assert httpx.get(f"{server.url}{path}", headers=KEY, timeout=30).status_code == 200, path
    for path in ("/v1/models", "/router/instances", "/metrics"):
        assert httpx.get(f"{router.url}{path}", headers=KEY, timeout=30).status_code == 200, path
    # the router's own calls carry its key: its health polls (/pd/info) and the requests it proxies
    (instance,) = httpx.get(f"{router.url}/router/instances", headers=KEY, timeout=10).json()["instances"]
    assert instance["healthy"] and instance["load"] is not None, instance
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    answer = httpx.post(f"{router.url}/v1/completions", json=body, headers=KEY, timeout=120)
    assert answer.status_code == 200, answer.text


# ---- limits ---------------------------------------------------------------------------------------------


def test_empty_message_flood_is_rejected_while_health_answers(server: ServerProcess) -> None:
    """8 concurrent 3.3 MB requests of 100,000 empty messages: each refused, /health never held up."""
    flood = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": ""}] * 100_000}).encode()
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set() or len(latencies) < 3:  # a flood refused fast may end first
                start = time.monotonic()
                assert client.get(f"{server.url}/health").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.05)

    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (API_KEY.encode(), len(flood))

    def post(_: int) -> tuple[int, bytes]:  # one sendall: no GIL held here to slow the poller down
        return raw_exchange(server.url, head, [flood], timeout=120)

    with ThreadPoolExecutor(9) as pool:
        poller = pool.submit(poll)
        try:
            answers = list(pool.map(post, range(8)))
        finally:
            done.set()
        poller.result()
    for answer in answers:
        assert assert_openai_error(answer, 400)["param"] == "messages"
    # rendering on the event loop held /health 3 s per request (16.8 s here); 3 s leaves room for a
    # loaded machine without letting one held-up render through
    assert len(latencies) >= 3 and max(latencies) < 3.0, latencies


@pytest.mark.parametrize("target", ["instance", "router"])
def test_body_over_the_limit_is_413_before_it_is_read(
    server: ServerProcess, router: KeyedRouter, target: str
) -> None:
    url, pid = (server.url, server.proc.pid) if target == "instance" else (router.url, router.proc.pid)
    before = rss_bytes(pid)
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    claimed = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
    claimed += b"Content-Type: application/json\r\nContent-Length: 314572800\r\n\r\n"
    start = time.monotonic()
    assert_openai_error(raw_exchange(url, claimed, [b"{" + b" " * MB]), 413)
    assert time.monotonic() - start < 10

    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
    chunked += b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n%s\r\n" % (MB, b" " * MB)
    body = (piece for _ in range(300))  # 300 MB, never built whole
    assert_openai_error(raw_exchange(url, chunked, body), 413)
    assert rss_bytes(pid) - before < 64 * MB


# ---- malformed HTTP, slashes, keep-alive ----------------------------------------------------------------


def test_malformed_http_is_answered_in_openai_shape(server: ServerProcess, router: KeyedRouter) -> None:
    for url in (server.url, router.url):
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n"
        assert_openai_error(raw_exchange(url, head), {400, 431})
        assert_openai_error(raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n"), 400)
        assert_openai_error(httpx.get(f"{url}/v1/nothing-here", headers=KEY, timeout=10), 404)
        assert_openai_error(httpx.delete(f"{url}/v1/models", headers=KEY, timeout=10), 405)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        answer = httpx.post(f"{url}/v1/chat/completions/", json=chat, headers=KEY, timeout=120)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{url}/v1/models/", headers=KEY, timeout=30).status_code == 200


def test_idle_keep_alive_outlives_the_routers_client(server: ServerProcess, router: KeyedRouter) -> None:
    """The server keeps an idle connection open longer than the router's client keeps it (a few
    seconds), so the router never sends on a connection the server is closing."""
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    socks = []
    for url in (server.url, router.url):
        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        socks.append(sock)
        sock.sendall(get)
        assert read_response(sock)[0] == 200
    try:
        time.sleep(6.5)  # past uvicorn's default of 5 s
        for sock in socks:
            sock.sendall(get)
            assert read_response(sock)[0] == 200
    finally:
        for sock in socks:
            sock.close()


def test_access_log_leaves_out_polls(server: ServerProcess) -> None:
    assert httpx.get(f"{server.v1}/models", headers=KEY, timeout=10).status_code == 200
    for path in ("/health", "/pd/info", "/metrics"):
        assert httpx.get(f"{server.url}{path}", headers=KEY, timeout=10).status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert wait_until(lambda: '"GET /v1/models HTTP/1.1" 200' in server.log_path.read_text(), 5), log[-3000:]
    for path in ("/health", "/pd/info", "/metrics"):
        assert f'"GET {path} HTTP/1.1" 200' not in log, path

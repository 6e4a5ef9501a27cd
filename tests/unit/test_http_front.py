"""The HTTP protocol both fronts run (http_edge/uvicorn_setup.py), over real sockets against a real
uvicorn process built with `uvicorn_config` around a two-route app (no model): the request-head limit
whatever the TCP segments (uvicorn's httptools protocol has none of its own; h11 refused only a head
still incomplete past it), parser errors in OpenAI's shape, keep-alive and pipelining.

    python -m tests.unit.test_http_front PORT httptools|h11     the server the tests start
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.e2e.cluster import Proc, free_port, wait_until
from tests.e2e.test_edge_limits import assert_openai_error, raw_exchange

LIMIT = 16 * 1024  # MAX_REQUEST_HEAD_BYTES, written out: the tests hold the value, not only the name


def head_of(size: int, path: str = "/echo") -> bytes:
    """A GET whose head (request line, headers, blank line) is exactly `size` bytes."""
    start = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode()
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


def read_answer(stream: BinaryIO) -> tuple[int, bytes]:
    """One answer from a buffered socket (answers to pipelined requests may come in one segment)."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        length = int(value) if name.strip().lower() == b"content-length" else length
    return status, stream.read(length)


@contextlib.contextmanager
def front(protocol: str, log_dir: Path) -> Iterator[str]:
    """A uvicorn process serving the echo app with `protocol` (httptools or h11): its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.unit.test_http_front", str(port), protocol]  # from the root
    proc = Proc(cmd, log_dir / f"front-{protocol}.log")
    proc.start()
    try:
        base = f"http://127.0.0.1:{port}"
        ok = wait_until(lambda: httpx.get(f"{base}/echo", timeout=2).status_code == 200, 30)
        assert ok, proc.log_path.read_text()
        yield base
    finally:
        proc.stop()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def any_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The front on either protocol: h11 is the fallback where httptools is not importable."""
    with front(request.param, tmp_path_factory.mktemp("front")) as base:
        yield base


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with front("httptools", tmp_path_factory.mktemp("front")) as base:
        yield base


def test_a_head_over_the_limit_is_431_however_it_arrives(url: str) -> None:
    whole = 1 << 20  # one write: the server reads the whole head at once
    assert raw_exchange(url, head_of(LIMIT), timeout=10)[0] == 200
    assert_openai_error(raw_exchange(url, head_of(LIMIT + 1), timeout=10), 431)  # h11 took this one
    assert_openai_error(raw_exchange(url, head_of(20_000) + b"x" * whole), 431)
    error = assert_openai_error(raw_exchange(url, head_of(300_000)), 431)  # 16 KB pieces, never ends
    assert str(LIMIT) in error["message"], error
    # a head that never ends, with the client still sending: answered, then the socket drains (no reset)
    endless = (b"q" * 65536 for _ in range(64))
    assert_openai_error(raw_exchange(url, b"GET /echo HTTP/1.1\r\nX-Endless: ", endless), 431)
    assert httpx.get(f"{url}/echo", timeout=10).status_code == 200


def test_parser_errors_keep_alive_and_pipelining(any_url: str) -> None:
    url = any_url
    assert_openai_error(raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n"), 400)
    bad_length = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    assert_openai_error(raw_exchange(url, bad_length), 400)
    post = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        stream = sock.makefile("rb")
        sock.sendall(post + head_of(200))  # two requests in one write: answered in order, kept alive
        assert read_answer(stream) == (200, b'{"method":"POST","body":5}')
        assert read_answer(stream) == (200, b'{"method":"GET","body":0}')
        sock.sendall(post)
        assert read_answer(stream) == (200, b'{"method":"POST","body":5}')
    with httpx.Client(timeout=10) as client:  # one connection, many requests
        for n in (0, 1, 70_000):
            answer = client.post(f"{url}/echo", content=b"z" * n)
            assert answer.json() == {"method": "POST", "body": n}


def test_both_fronts_run_httptools() -> None:
    from pdserve.http_edge.httptools_front import OpenAIShapedHttpTools
    from pdserve.http_edge.uvicorn_setup import HTTP_PROTOCOL

    assert HTTP_PROTOCOL is OpenAIShapedHttpTools


def serve(port: int, protocol: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from pdserve.http_edge.h11_front import OpenAIShapedH11
    from pdserve.http_edge.uvicorn_setup import uvicorn_config

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"method": request.method, "body": len(await request.body())})

    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])
    config = uvicorn_config(app, "127.0.0.1", port, "warning")
    if protocol == "h11":
        config.http = OpenAIShapedH11  # what uvicorn_setup picks where httptools is missing
    uvicorn.Server(config).run()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])

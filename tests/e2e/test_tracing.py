"""OpenTelemetry traces across real processes: a router, a decode and a prefill instance, each started
with --otlp-traces-endpoint pointing at a small OTLP/HTTP collector this test runs. One client request
must give one trace: router.request -> decode.request -> prefill.request, each the parent of the next,
the trace context carried over HTTP (traceparent) and then in the Reserve message."""

from __future__ import annotations

import contextlib
import gzip
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from pdserve.cli import build_parser, server_config
from pdserve.disagg import protocol as p
from tests.e2e.cluster import Instance, Router, free_port, wait_until

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class Collector:
    """An OTLP/HTTP traces endpoint in a thread: POST /v1/traces (protobuf) -> `spans`."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1/traces"

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    span = Span(
                        attrs.get("service.name", ""),
                        s.name,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                    )
                    with self.lock:
                        self.spans.append(span)

    def trace(self, trace_id: str) -> dict[str, Span]:
        with self.lock:
            return {s.name: s for s in self.spans if s.trace_id == trace_id}


@dataclass
class TracedCluster:
    collector: Collector
    router: Router
    prefill: Instance
    decode: Instance


@pytest.fixture(scope="module")
def traced(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedCluster]:
    log_dir: Path = tmp_path_factory.mktemp("tracing")
    collector = Collector()
    collector.thread.start()
    otlp = ["--otlp-traces-endpoint", collector.url]
    instances = [Instance(role, role, model_dir, log_dir, extra=otlp) for role in ("prefill", "decode")]
    prefill, decode = instances
    router = Router(log_dir / "router.log", [prefill.url], [decode.url], health_interval=0.5)
    router.proc.cmd += otlp
    try:
        for instance in instances:
            instance.start()
        for instance in instances:
            instance.wait_ready()
        router.start().wait_healthy()
        yield TracedCluster(collector, router, prefill, decode)
    finally:
        procs = [router.proc, *(i.proc for i in instances if i.proc is not None)]
        for proc in procs:  # all drain at once, not one after the other
            proc.signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop()
        collector.server.shutdown()


def _complete(router: Router, headers: dict[str, str], stream: bool) -> None:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "One, two, three,", "max_tokens": 4}
    body |= {"temperature": 0, "stream": stream}
    answer = httpx.post(f"{router.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text


def _wait_trace(collector: Collector, trace_id: str) -> dict[str, Span]:
    names = {"router.request", "decode.request", "prefill.request"}
    wait_until(lambda: names <= set(collector.trace(trace_id)), 20.0)
    spans = collector.trace(trace_id)
    assert names <= set(spans), f"trace {trace_id} has {sorted(spans)}; all spans: {collector.spans}"
    return spans


def _assert_chain(spans: dict[str, Span], client_span: str) -> None:
    router, decode, prefill = spans["router.request"], spans["decode.request"], spans["prefill.request"]
    assert (router.service, decode.service, prefill.service) == (
        "pdserve-router",
        "pdserve-decode",
        "pdserve-prefill",
    )
    assert router.parent_id == client_span
    assert decode.parent_id == router.span_id
    assert prefill.parent_id == decode.span_id


def test_one_trace_across_router_decode_and_prefill(traced: TracedCluster) -> None:
    parent = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    _complete(traced.router, parent, stream=True)
    _assert_chain(_wait_trace(traced.collector, CLIENT_TRACE), CLIENT_SPAN)

    # a client that sends no trace context: the router starts the trace, and it still spans all three
    before = {s.trace_id for s in traced.collector.spans}
    _complete(traced.router, {}, stream=False)
    deadline = time.monotonic() + 20.0
    new: set[str] = set()
    while time.monotonic() < deadline and not new:
        new = {s.trace_id for s in traced.collector.spans if s.name == "router.request"} - before
        time.sleep(0.2)
    assert len(new) == 1, traced.collector.spans
    _assert_chain(_wait_trace(traced.collector, new.pop()), "")

    # the same two requests in the stage histograms: computed on the prefill instance (which answers
    # no HTTP request for them), received and decoded on the decode instance
    prefill, decode = traced.prefill, traced.decode
    stage = "pdserve_request_{}_time_seconds_count".format
    assert prefill.metric(stage("prefill")) == 2 and prefill.metric(stage("kv_transfer")) == 0
    assert decode.metric(stage("kv_transfer")) == 2 and decode.metric(stage("decode")) == 2
    assert decode.metric(stage("prefill")) == 0 and decode.metric(stage("queue")) == 2


def test_a_reserve_with_a_malformed_trace_context_is_refused() -> None:
    parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    reserve = p.Reserve("tcp://127.0.0.1:5000", "t1", [1, 2], {}, [0], 1.0, trace_context=parent)
    assert p.decode(p.encode(reserve)) == reserve
    for bad in ("not a traceparent", f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01", "x" * 100_000):
        reserve.trace_context = bad
        with pytest.raises(ValueError, match="trace_context"):
            p.decode(p.encode(reserve))


def test_the_endpoint_must_be_an_http_url() -> None:
    parser = build_parser()
    url = "http://127.0.0.1:4318/v1/traces"
    args = parser.parse_args(["serve", "--otlp-traces-endpoint", url])
    assert server_config(args).otlp_traces_endpoint == url
    routed = ["router", "--prefill", "http://a:1", "--decode", "http://b:2", "--otlp-traces-endpoint"]
    assert parser.parse_args([*routed, url]).otlp_traces_endpoint == url
    for bad in ("ftp://collector/v1/traces", "collector:4318", "http://h:99999"):
        for argv in (["serve", "--otlp-traces-endpoint", bad], [*routed, bad]):
            with pytest.raises(SystemExit):
                parser.parse_args(argv)

"""OpenTelemetry spans for one request across the cluster, with the W3C trace context carried along.

    client ──(traceparent?)──▶ router "router.request" ──traceparent header──▶ decode "decode.request"
        decode ── Reserve.trace_context (a traceparent string) ──▶ prefill "prefill.request"

`setup(endpoint, service)` installs an SDK tracer provider exporting to an OTLP/HTTP endpoint
(`--otlp-traces-endpoint`); without it spans are the API's no-op ones, which still pass an incoming
trace context on, so a traced router in front of untraced instances keeps one trace id. The SDK and the
exporter are imported only when tracing is asked for. `install(provider)` puts any provider in place
(tests use one with an in-memory exporter).

A trace context from a peer is data: only a well-formed traceparent is used (TRACEPARENT); anything
else starts a new trace.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_PROPAGATOR = TraceContextTextMapPropagator()
_provider: Any = None  # the provider in place (process-wide, as OpenTelemetry's own)


def install(provider: Any) -> None:
    """Use `provider` (an SDK TracerProvider) for every span from now on."""
    global _provider
    _provider = provider


def setup(endpoint: str | None, service: str) -> None:
    """Export spans of this process, named `service`, to the OTLP/HTTP `endpoint` (None: no tracing)."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500)
    )
    install(provider)
    logger.info("sending OpenTelemetry traces to %s as %s", endpoint, service)


def shutdown() -> None:
    """Flush the spans still queued (at exit)."""
    if _provider is not None:
        _provider.shutdown()


def _tracer() -> trace.Tracer:
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer("pdserve")  # type: ignore[no-any-return]


def _parent(traceparent: str | None) -> context.Context:
    if not traceparent or TRACEPARENT.fullmatch(traceparent) is None:
        return context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent})


def start(name: str, traceparent: str | None = None, **attributes: Any) -> trace.Span:
    """A server span, child of `traceparent` (an incoming header or Reserve field) if well formed."""
    return _tracer().start_span(
        name, context=_parent(traceparent), kind=trace.SpanKind.SERVER, attributes=attributes
    )


def incoming(headers: Mapping[str, str]) -> str | None:
    """The traceparent of an HTTP request's headers."""
    return headers.get("traceparent")


def traceparent(span: trace.Span) -> str | None:
    """The W3C traceparent naming `span` as the parent, or None where there is no trace at all."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def headers(span: trace.Span) -> dict[str, str]:
    """The headers that carry `span` as the parent to the next hop."""
    parent = traceparent(span)
    return {"traceparent": parent} if parent else {}


def record(name: str, traceparent: str | None, start_monotonic: float, **attributes: Any) -> None:
    """A span that began at `start_monotonic` (time.monotonic()) and ends now: for work whose start
    and end are seen at two points of a thread that keeps no span between them."""
    if _provider is None:
        return
    now_ns = time.time_ns()
    start_ns = now_ns - int((time.monotonic() - start_monotonic) * 1e9)
    span = _tracer().start_span(
        name,
        context=_parent(traceparent),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        start_time=start_ns,
    )
    span.end(end_time=now_ns)

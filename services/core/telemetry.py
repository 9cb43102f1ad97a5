"""Tracing in one place: W3C trace context in NATS headers, PRODUCER/CONSUMER spans.

Services do not call the tracer around the transport themselves; `services.core.bus` calls
`producer_span` on publish and `consumer_span` on receive. Exporters are configured by the
standard OTEL_* environment variables when `telemetry.traces = "otlp"`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.core.config import TelemetryConfig

TRACER_NAME = "relais"
_propagator = TraceContextTextMapPropagator()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to a local file, so `relais trace` works without a trace backend."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(s)) for s in spans]
        with self._lock, self._path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_record(span: ReadableSpan) -> dict[str, object]:
    ctx = span.context
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent else "",
        "name": span.name,
        "kind": span.kind.name,
        "service": str(span.resource.attributes.get("service.name", "")),
        "start": span.start_time,
        "end": span.end_time,
        "attributes": {k: v for k, v in (span.attributes or {}).items()},
        "links": [f"{link.context.trace_id:032x}" for link in span.links],
        "status": span.status.status_code.name,
    }


def setup_tracing(config: TelemetryConfig, service_name: str) -> TracerProvider | None:
    """Install a tracer provider for this process according to config; None when tracing is off."""
    if config.traces == "none":
        return None
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"relais-{service_name}")}
    )
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if config.traces == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif config.traces == "console":
        exporter = ConsoleSpanExporter()
    else:
        exporter = JsonLinesExporter(config.traces_file or "relais-data/traces.jsonl")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def inject(headers: MutableMapping[str, str], span: Span | None = None) -> None:
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(headers, context=ctx)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return _propagator.extract(dict(headers or {}))


def traceparent_of(span: Span) -> str:
    carrier: dict[str, str] = {}
    inject(carrier, span)
    return carrier.get("traceparent", "")


def _attrs(destination: str, operation: str, extra: Mapping[str, object] | None) -> dict[str, object]:
    attrs: dict[str, object] = {
        "messaging.system": "nats",
        "messaging.destination.name": destination,
        "messaging.operation.type": operation,
    }
    for key, value in (extra or {}).items():
        if value is not None and value != "":
            attrs[key] = value
    return attrs


@contextmanager
def producer_span(
    subject: str, headers: MutableMapping[str, str], attributes: Mapping[str, object] | None = None
) -> Iterator[Span]:
    """A PRODUCER span around one publish, with its context injected into the NATS headers."""
    parent = extract(headers) if "traceparent" in headers else None
    with tracer().start_as_current_span(
        f"send {subject}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes=_attrs(subject, "send", attributes),
    ) as span:
        inject(headers, span)
        yield span


@contextmanager
def consumer_span(
    subject: str,
    headers: Mapping[str, str] | None,
    attributes: Mapping[str, object] | None = None,
    links: Sequence[str] = (),
) -> Iterator[Span]:
    """A CONSUMER span for processing one message, child of the producer's context."""
    link_objs = []
    for traceparent in links:
        span_ctx = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
        if span_ctx.is_valid:
            link_objs.append(Link(span_ctx))
    with tracer().start_as_current_span(
        f"process {subject}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes=_attrs(subject, "process", attributes),
        links=link_objs,
    ) as span:
        yield span


def context_from_traceparent(traceparent: str) -> otel_context.Context:
    return extract({"traceparent": traceparent} if traceparent else {})

"""Tracing in one place: W3C trace context in NATS headers, PRODUCER/CONSUMER spans.

Services do not call the tracer around the transport themselves; `services.core.bus` calls
`producer_span` on publish, each service's handler opens one `consumer_span` per message, and
`services.core.events` annotates the current span with each outcome. Exporters are configured by
the standard OTEL_* environment variables when `telemetry.traces = "otlp"`.

One message is one trace: the ingress' "smtp receive" span is the root, its traceparent travels
in the envelope (`trace_context`) and in every NATS message's headers, so a retry fired by a
JetStream schedule hours later, and the DSN generated for a bounce, join the same trace.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
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
from services.core.topology import subject_template

log = logging.getLogger(__name__)

TRACER_NAME = "relais"
_propagator = TraceContextTextMapPropagator()

# ---------------------------------------------------------------------------------------------
# Attribute names: the one list of span attribute keys. Metric labels use the same nouns
# (`label(POOL)` == "pool"), so a dashboard and a trace speak the same language.

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_DESTINATION_TEMPLATE = "messaging.destination.template"
MESSAGING_OPERATION = "messaging.operation.type"
MESSAGE_ID = "relais.message_id"
JOB_ID = "relais.job_id"
ACCOUNT = "relais.account"
SENDER_DOMAIN = "relais.sender_domain"
POOL = "relais.pool"
SOURCE_IP = "relais.source_ip"
SITE = "relais.site"
MX_HOST = "relais.mx_host"
ATTEMPT = "relais.attempt"
OUTCOME = "relais.outcome"
BOUNCE_CATEGORY = "relais.bounce_category"
DSN_FOR = "relais.dsn_for"
RECIPIENTS = "relais.recipients"
RECIPIENT_COUNT = "relais.recipient_count"
REPLY_CODE = "smtp.reply.code"
ENHANCED_STATUS = "smtp.reply.enhanced_status"
REPLY_TEXT = "smtp.reply.text"
TLS_VERSION = "tls.protocol.version"


def label(attribute: str) -> str:
    """The Prometheus label name for a span attribute: its last dotted part."""
    return attribute.rsplit(".", 1)[-1]


# The message being processed in this task, for log lines (works with tracing off, too).
_message_id: contextvars.ContextVar[str] = contextvars.ContextVar("relais_message_id", default="")


# A proxy until a provider is installed, then the provider's tracer; looked up once, because
# `trace.get_tracer` builds a new SDK tracer per call (a third of a span's cost when repeated).
_tracer = trace.ProxyTracer(TRACER_NAME)


def tracer() -> trace.Tracer:
    return _tracer


# ---------------------------------------------------------------------------------------------
# Exporters and setup


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to a local file, so `relais trace` works without a trace backend.

    The file is rotated once past `max_bytes` (one previous generation kept as `<file>.1`), so
    a laptop keeps recent traces without growing without bound.
    """

    def __init__(self, path: str | Path, max_bytes: int = 50 * 1024 * 1024) -> None:
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans).encode()
        with self._lock:
            try:
                if self._path.stat().st_size > self._max_bytes:
                    self._path.replace(self._path.with_name(self._path.name + ".1"))
            except FileNotFoundError:
                pass
            # One write() on an O_APPEND descriptor: the four services of `relais up` share the
            # file, and a buffered writer would split a batch into chunks that interleave.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
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
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "links": [f"{link.context.trace_id:032x}" for link in span.links],
        "status": span.status.status_code.name,
    }


def otlp_exporter(env: Mapping[str, str] | None = None) -> SpanExporter:
    """The OTLP exporter chosen by OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL (endpoint etc. from env too).

    http/protobuf is the default and a dependency; grpc works when
    opentelemetry-exporter-otlp-proto-grpc is installed, and fails loudly otherwise (silently
    falling back would send to the wrong port).
    """
    env = os.environ if env is None else env
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip() or "http/protobuf"
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise RuntimeError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the opentelemetry-exporter-otlp-proto-grpc package"
            ) from exc
        return GrpcExporter()
    if protocol != "http/protobuf":
        raise RuntimeError(f"unsupported OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} (http/protobuf or grpc)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def setup_tracing(config: TelemetryConfig, service_name: str) -> TracerProvider | None:
    """Install a tracer provider for this process according to config; None when tracing is off.

    OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG are read by the SDK's TracerProvider itself,
    OTEL_BSP_* by the batch processor, OTEL_RESOURCE_ATTRIBUTES by Resource.create.
    """
    if config.traces == "none":
        # A provider set up before Relais started (e.g. by opentelemetry-instrument) still
        # gets the spans, as it did when every span asked OpenTelemetry.
        adopt_installed_provider()
        return None
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"relais-{service_name}")}
    )
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if config.traces == "otlp":
        exporter = otlp_exporter()
    elif config.traces == "console":
        exporter = ConsoleSpanExporter()
    else:
        exporter = JsonLinesExporter(config.traces_file or "relais-data/traces.jsonl")
    provider.add_span_processor(span_processor(exporter))
    _quiet_span_drops()
    install_provider(provider)
    return provider


def span_processor(exporter: SpanExporter) -> BoundedBatchSpanProcessor:
    """The batching processor every service exports through, its shutdown bounded."""
    # An explicit OTEL_BSP_MAX_QUEUE_SIZE wins (the SDK reads it when given None).
    queue = None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else SPAN_QUEUE_DEFAULT
    return BoundedBatchSpanProcessor(exporter, max_queue_size=queue)


# How long a stopping service waits for its last spans to be exported, then how long it gives
# the export thread to count what is left as dropped. The SDK's shutdown waits up to 30 s for
# its export thread (`BatchSpanProcessor.shutdown` takes no timeout), and the OTLP exporter
# retries an unreachable collector for up to OTEL_EXPORTER_OTLP_TIMEOUT (10 s) per batch: a
# collector that is down held every pod stop and every Ctrl-C of `relais up` for 30 s.
SPAN_SHUTDOWN_BUDGET = 4.0
SPAN_SHUTDOWN_GRACE = 1.0


class BoundedBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, whose shutdown gives up after `shutdown_budget` seconds: the
    exporter is then shut down (which ends the OTLP exporters' retries) and the spans not
    exported are counted in `spans_dropped`, as are those of every failed export."""

    def __init__(
        self, exporter: SpanExporter, *, shutdown_budget: float = SPAN_SHUTDOWN_BUDGET, **options: int | None
    ) -> None:
        self._accounting = _ExportAccounting(exporter)
        self.shutdown_budget = shutdown_budget
        self._done = False
        super().__init__(self._accounting, **options)

    def shutdown(self) -> None:
        # The provider's own atexit hook shuts it down again; a thread started that late is
        # refused (RuntimeError on some Pythons), and there is nothing left to export anyway.
        if self._done:
            return
        self._done = True
        before = spans_dropped()
        # The SDK's shutdown in a thread of its own, so that waiting for it can end.
        stopping = threading.Thread(target=super().shutdown, name="relais-span-shutdown", daemon=True)
        stopping.start()
        stopping.join(self.shutdown_budget)
        if stopping.is_alive():
            self._accounting.abandon()
            stopping.join(SPAN_SHUTDOWN_GRACE)
        dropped = spans_dropped() - before
        if dropped:
            log.warning("%d span(s) could not be exported before shutdown (is the collector up?)", dropped)


class _ExportAccounting(SpanExporter):
    """Wraps the real exporter: counts the spans of failed exports as dropped, and once
    `abandon`ed (the shutdown's budget spent) counts the batch being sent and drops every later
    one at once instead of trying."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self._lock = threading.Lock()
        self._in_flight = 0
        self._abandoned = False
        self._stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._abandoned:
                _span_drops.add(len(spans))
                return SpanExportResult.FAILURE
            self._in_flight += len(spans)
        result = SpanExportResult.FAILURE
        try:
            result = self._exporter.export(spans)
            return result
        finally:
            with self._lock:
                self._in_flight -= len(spans)
                # After `abandon`, a batch that was in flight is already counted.
                if result is not SpanExportResult.SUCCESS and not self._abandoned:
                    _span_drops.add(len(spans))

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            _span_drops.add(self._in_flight)
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


# Whether a tracer provider is installed: by `install_provider`, or found by
# `adopt_installed_provider`. OpenTelemetry keeps its global provider for the life of the
# process, so this never turns back; a flag, because asking OpenTelemetry for its provider reads
# the environment on every call until one is set, on every span of a service with tracing off.
_installed = False


def install_provider(provider: TracerProvider) -> None:
    """Make `provider` this process's tracer provider (OpenTelemetry allows one per process)."""
    trace.set_tracer_provider(provider)
    adopt_installed_provider()


def adopt_installed_provider() -> None:
    """Record spans through whatever real provider OpenTelemetry has, also one set without
    `install_provider` (opentelemetry-instrument, a test harness); nothing when there is none."""
    global _installed
    if not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        _installed = True


# The SDK's default span queue (2,048) fills within a second at a few hundred messages/s, as each
# message makes several spans per service and the export thread competes for the GIL: spans
# were dropped in bench/tracing.py. 16,384 finished spans hold a few tens of MB at worst.
SPAN_QUEUE_DEFAULT = 16384


class _SpanDrops(logging.Filter):
    """The SDK logs "Queue full, dropping Span." once per dropped span, a log line per span in a
    burst: count them all (`spans_dropped`, exported as relais_spans_dropped_total) and let one
    warning through per `interval`, with the count so far."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.dropped = 0
        self._lock = threading.Lock()
        self._interval = interval
        self._last_warning = -interval

    def filter(self, record: logging.LogRecord) -> bool:
        # The SDK's loggers are kept open at WARNING (`_quiet_span_drops`) so that drops are
        # counted; what is logged still follows the level the service was started with.
        shown = logging.getLogger().isEnabledFor(record.levelno)
        if not str(record.msg).startswith("Queue full"):
            return shown
        self.add(1)
        if not shown:
            return False
        now = time.monotonic()
        if now - self._last_warning < self._interval:
            return False
        self._last_warning = now
        record.msg = (
            "span export queue full: %d span(s) dropped so far (raise OTEL_BSP_MAX_QUEUE_SIZE or sample)"
        )
        record.args = (self.dropped,)
        return True

    def add(self, count: int) -> None:
        # From the threads that end spans and from the export thread.
        with self._lock:
            self.dropped += count


_span_drops = _SpanDrops()


def _quiet_span_drops() -> None:
    # The logger of the SDK's batching code: shared by the span and log processors in recent
    # SDKs, the trace exporter module's own in older ones.
    for name in ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export"):
        target = logging.getLogger(name)
        if _span_drops not in target.filters:
            # First: the SDK's own DuplicateFilter (1.3x on) lets one identical record through
            # per 20 s and stops the filter chain for the rest, which counted one drop in
            # thousands.
            target.filters.insert(0, _span_drops)
        # A logger's filters only see records it is enabled for: with the service at ERROR
        # (`--log-level ERROR`), "Queue full" was never created and no drop was counted.
        if not target.isEnabledFor(logging.WARNING):
            target.setLevel(logging.WARNING)


def spans_dropped() -> int:
    """Spans this process finished and never exported: no room in the export queue, an export
    that failed (collector unreachable), or still unsent when shutdown gave up on them."""
    return _span_drops.dropped


# ---------------------------------------------------------------------------------------------
# Propagation and spans


def inject(headers: MutableMapping[str, str], span: Span | None = None) -> None:
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(headers, context=ctx)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    return _propagator.extract(dict(headers or {}))


def traceparent_of(span: Span) -> str:
    carrier: dict[str, str] = {}
    inject(carrier, span)
    return carrier.get("traceparent", "")


def trace_id_of(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) >= 3 else ""


def _named(
    operation: str, destination: str, extra: Mapping[str, object] | None
) -> tuple[str, dict[str, object]]:
    """A messaging span's name (by the subject's template) and attributes."""
    attrs: dict[str, object] = {
        MESSAGING_SYSTEM: "nats",
        MESSAGING_DESTINATION: destination,
        MESSAGING_OPERATION: operation,
    }
    template = subject_template(destination)
    if template != destination:
        attrs[MESSAGING_DESTINATION_TEMPLATE] = template
    for key, value in (extra or {}).items():
        if value is not None and value != "":
            attrs[key] = value
    return f"{operation} {template}", attrs


def _producer_parent(headers: Mapping[str, str]) -> otel_context.Context | None:
    """Parent of a publish: the current span when it belongs to the same trace as the headers.

    Callers pass the message's root traceparent in the headers for work that may run outside a
    span (a scheduled retry, a bounce notice). Inside a consumer span of that same message the
    current span is the better parent: it shows *which* attempt scheduled the retry.
    """
    if "traceparent" not in headers:
        return None
    wanted = trace_id_of(headers["traceparent"])
    current = trace.get_current_span().get_span_context()
    if current.is_valid and f"{current.trace_id:032x}" == wanted:
        return None
    return extract(headers)


def recording() -> bool:
    """Whether this process records spans: a tracer provider is installed (`install_provider`,
    through `setup_tracing` or a test's) or adopted (`adopt_installed_provider`). Without one,
    `producer_span` and `consumer_span` make no span objects at all; they only carry the trace
    context on, exactly as OpenTelemetry's no-op tracer would (that costs a few percent of a
    service's CPU per message for nothing)."""
    return _installed


@contextmanager
def producer_span(
    subject: str, headers: MutableMapping[str, str], attributes: Mapping[str, object] | None = None
) -> Iterator[Span]:
    """A PRODUCER span around one publish, with its context injected into the NATS headers."""
    parent = _producer_parent(headers)
    if not recording():
        # The no-op tracer's span would be the parent's context: the headers' own traceparent
        # (already there) or the current span's.
        current = trace.get_current_span()
        if parent is None and current.get_span_context().is_valid:
            inject(headers, current)
        yield current
        return
    name, attrs = _named("send", subject, attributes)
    with tracer().start_as_current_span(
        name, context=parent, kind=SpanKind.PRODUCER, attributes=attrs
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
    token = _message_id.set(str((attributes or {}).get(MESSAGE_ID, "") or ""))
    try:
        if not recording():
            yield from _carry_context(headers)
            return
        link_objs = []
        for traceparent in links:
            span_ctx = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
            if span_ctx.is_valid:
                link_objs.append(Link(span_ctx))
        name, attrs = _named("process", subject, attributes)
        with tracer().start_as_current_span(
            name, context=extract(headers), kind=SpanKind.CONSUMER, attributes=attrs, links=link_objs
        ) as span:
            yield span
    finally:
        _message_id.reset(token)


def _carry_context(headers: Mapping[str, str] | None) -> Iterator[Span]:
    """`consumer_span` without a tracer provider: the producer's context becomes current (what
    the no-op tracer's span amounts to), so the publishes made while processing carry it on."""
    if not headers or "traceparent" not in headers:
        yield trace.get_current_span()
        return
    token = otel_context.attach(extract(headers))
    try:
        yield trace.get_current_span()
    finally:
        otel_context.detach(token)


@contextmanager
def linked_span(
    name: str,
    headers: Sequence[Mapping[str, str] | None],
    attributes: Mapping[str, object] | None = None,
    kind: SpanKind = SpanKind.CLIENT,
) -> Iterator[Span]:
    """A span of its own trace for work done for many messages at once (a webhook batch), linked
    to each message's trace, so every message's trace points at it and it at them."""
    links = []
    for carrier in headers:
        span_ctx = trace.get_current_span(extract(carrier)).get_span_context()
        if span_ctx.is_valid:
            links.append(Link(span_ctx))
    clean = {k: v for k, v in (attributes or {}).items() if v is not None and v != ""}
    root = otel_context.Context()  # not a child of whatever happens to be current
    with tracer().start_as_current_span(name, context=root, kind=kind, attributes=clean, links=links) as span:
        yield span


def context_from_traceparent(traceparent: str) -> otel_context.Context:
    return extract({"traceparent": traceparent} if traceparent else {})


# Addresses an outcome's span event names (`relais.recipients`); `relais.recipient_count` counts
# them all. A delivery job holds every recipient of a message at one domain: a list of 1,000 at
# one provider put ~25 KB of addresses into each outcome event of each attempt, which collectors
# and backends truncate or refuse (and which is personal data). The events stream, the log line
# and `relais message` keep every recipient.
RECIPIENTS_NAMED = 10

# Characters of an MX's reply text kept on a span event (`smtp.reply.text`): the text is what tells
# greylisting from a blocklist behind the same "451 4.7.1", but a multi-line reply can run to
# kilobytes, and every attempt of a deferred job would carry it. The events stream (`relais
# message`) keeps it whole.
REPLY_TEXT_MAX = 512


def annotate_outcome(kind: str, attributes: Mapping[str, object], recipients: Sequence[str] = ()) -> None:
    """Record one outcome (delivered, deferred, bounced ...) on the span being processed.

    A span event per outcome, because one attempt can deliver some recipients and defer others;
    the first reply also becomes span attributes so backends can filter on it.
    """
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attrs = {k: v for k, v in attributes.items() if v is not None and v != ""}
    if recipients:
        attrs[RECIPIENTS] = ",".join(recipients[:RECIPIENTS_NAMED])
        attrs[RECIPIENT_COUNT] = len(recipients)
    span.add_event(f"relais.{kind}", attrs)
    existing = getattr(span, "attributes", None) or {}
    for key in (REPLY_CODE, ENHANCED_STATUS, BOUNCE_CATEGORY):
        if key in attrs and key not in existing:
            span.set_attribute(key, attrs[key])  # type: ignore[arg-type]
    # The text goes with the reply whose codes the span shows (`record_reply` may have set them
    # from another recipient's outcome of the attempt).
    shown = getattr(span, "attributes", None) or {}
    same_reply = all(shown.get(key) == attrs.get(key) for key in (REPLY_CODE, ENHANCED_STATUS))
    if REPLY_TEXT in attrs and REPLY_TEXT not in shown and same_reply:
        span.set_attribute(REPLY_TEXT, attrs[REPLY_TEXT])  # type: ignore[arg-type]


def record_reply(code: int, enhanced_status: str) -> None:
    """The SMTP reply of the attempt being processed, as attributes of its span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(REPLY_CODE, code)
        span.set_attribute(ENHANCED_STATUS, enhanced_status)


def log_fields() -> dict[str, str]:
    """trace_id / span_id / message_id of what this task is doing now, for structured logs."""
    fields: dict[str, str] = {}
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        fields["trace_id"] = f"{ctx.trace_id:032x}"
        fields["span_id"] = f"{ctx.span_id:016x}"
    message_id = _message_id.get()
    if not message_id:
        span = trace.get_current_span()
        message_id = str((getattr(span, "attributes", None) or {}).get(MESSAGE_ID, "") or "")
    if message_id:
        fields["message_id"] = message_id
    return fields

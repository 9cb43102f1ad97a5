"""Trace propagation through NATS headers, producer parenting, outcome annotation, log fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.core import telemetry as t
from services.core.config import TelemetryConfig
from services.core.runtime import JsonFormatter
from tests.support.spans import collecting


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with collecting() as exporter:
        yield exporter


def by_name(exporter: InMemorySpanExporter) -> dict[str, object]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_consumer_span_is_a_child_of_the_producer_span_through_headers(spans) -> None:
    headers: dict[str, str] = {}
    with t.tracer().start_as_current_span("smtp receive", kind=SpanKind.SERVER):
        with t.producer_span("relais.route", headers, {t.MESSAGE_ID: "m1"}):
            pass
    assert headers["traceparent"].startswith("00-")
    with t.consumer_span("relais.route", headers, {t.MESSAGE_ID: "m1"}):
        pass
    got = by_name(spans)
    root, send, process = got["smtp receive"], got["send relais.route"], got["process relais.route"]
    assert send.parent.span_id == root.context.span_id
    assert process.parent.span_id == send.context.span_id
    assert {s.context.trace_id for s in got.values()} == {root.context.trace_id}
    assert send.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert process.attributes[t.MESSAGING_SYSTEM] == "nats"
    assert process.attributes[t.MESSAGING_OPERATION] == "process"
    assert process.attributes[t.MESSAGING_DESTINATION] == "relais.route"


def test_a_retry_published_inside_the_attempt_is_parented_by_the_attempt(spans) -> None:
    attempt_headers: dict[str, str] = {}
    with t.tracer().start_as_current_span("smtp receive") as root:
        root_tp = t.traceparent_of(root)
        with t.producer_span("relais.deliver.default", attempt_headers):
            pass
    with t.consumer_span("relais.deliver.default", attempt_headers) as attempt:
        retry_headers = {"traceparent": root_tp}
        with t.producer_span("relais.retry.route.j1.1", retry_headers):
            pass
    retry = by_name(spans)["send relais.retry.route.{key}.{attempt}"]
    assert retry.parent.span_id == attempt.get_span_context().span_id
    assert retry.context.trace_id == root.get_span_context().trace_id


def test_outside_any_span_the_root_traceparent_in_headers_is_the_parent(spans) -> None:
    with t.tracer().start_as_current_span("smtp receive") as root:
        root_tp = t.traceparent_of(root)
    headers = {"traceparent": root_tp}
    with t.producer_span("relais.bounce", headers):
        pass
    send = by_name(spans)["send relais.bounce"]
    assert send.parent.span_id == root.get_span_context().span_id


def test_outcomes_become_span_events_and_the_first_reply_attributes(spans) -> None:
    with t.consumer_span("relais.deliver.default", {}, {t.MESSAGE_ID: "m2"}):
        t.annotate_outcome("deferred", {t.REPLY_CODE: 451, t.ENHANCED_STATUS: "4.3.0", t.POOL: ""})
        t.annotate_outcome("delivered", {t.REPLY_CODE: 250, t.ENHANCED_STATUS: "2.0.0"})
    (span,) = spans.get_finished_spans()
    assert [e.name for e in span.events] == ["relais.deferred", "relais.delivered"]
    assert t.POOL not in span.events[0].attributes, "empty values are not recorded"
    assert span.attributes[t.REPLY_CODE] == 451


def test_json_logs_carry_trace_id_and_message_id_of_the_current_message(spans) -> None:
    record = logging.LogRecord("relais.test", logging.INFO, __file__, 1, "attempt failed", None, None)
    with t.consumer_span("relais.route", {}, {t.MESSAGE_ID: "0190abc"}) as span:
        line = json.loads(JsonFormatter().format(record))
        trace_id = f"{span.get_span_context().trace_id:032x}"
    assert line["message_id"] == "0190abc"
    assert line["trace_id"] == trace_id
    assert line["msg"] == "attempt failed"
    outside = json.loads(JsonFormatter().format(record))
    assert "message_id" not in outside and "trace_id" not in outside


def test_metric_labels_are_the_span_attribute_nouns() -> None:
    assert [t.label(a) for a in (t.POOL, t.SITE, t.SOURCE_IP, t.ACCOUNT, t.BOUNCE_CATEGORY)] == [
        "pool",
        "site",
        "source_ip",
        "account",
        "bounce_category",
    ]


def test_otlp_protocol_comes_from_the_standard_variables() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert isinstance(t.otlp_exporter({}), OTLPSpanExporter)
    assert isinstance(t.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}), OTLPSpanExporter)
    with pytest.raises(RuntimeError, match="unsupported"):
        t.otlp_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="grpc"):
            t.otlp_exporter({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})


def test_tracing_off_installs_nothing() -> None:
    assert t.setup_tracing(TelemetryConfig(traces="none"), "router") is None


def test_trace_id_of_a_traceparent() -> None:
    assert t.trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") == (
        "0af7651916cd43dd8448eb211c80319c"
    )
    assert t.trace_id_of("") == ""


def test_each_outcome_event_is_one_json_log_line_with_message_and_trace_id() -> None:
    from services.core.events import Event, event_log, log_event, outcome_attributes

    event = Event(
        "deferred",
        "m7",
        "acme",
        ["x@alpha.test"],
        pool="default",
        site="alpha.test",
        attempt=1,
        reply={"code": 451, "enhanced": "4.3.0", "text": "later"},
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    event_log.addHandler(handler)
    level = event_log.level
    event_log.setLevel(logging.INFO)
    try:
        log_event(event, outcome_attributes(event))
    finally:
        event_log.removeHandler(handler)
        event_log.setLevel(level)
    (record,) = records
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == "relais.events" and line["msg"] == "deferred x@alpha.test 451 4.3.0"
    assert line["message_id"] == "m7" and line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["event"]["outcome"] == "deferred" and line["event"]["code"] == 451
    assert line["event"]["pool"] == "default" and line["event"]["attempt"] == 1


def test_a_burst_of_dropped_spans_is_one_warning_and_a_count(caplog) -> None:  # type: ignore[no-untyped-def]
    drops = t._SpanDrops(interval=60.0)
    logger = logging.getLogger("test.span_drops")
    logger.addFilter(drops)
    try:
        with caplog.at_level(logging.WARNING, logger="test.span_drops"):
            for _ in range(100):
                logger.warning("Queue full, dropping %s.", "span")
            logger.warning("something else")
    finally:
        logger.removeFilter(drops)
    assert drops.dropped == 100
    assert [r.getMessage() for r in caplog.records] == [
        "span export queue full: 1 span(s) dropped so far (raise OTEL_BSP_MAX_QUEUE_SIZE or sample)",
        "something else",
    ]

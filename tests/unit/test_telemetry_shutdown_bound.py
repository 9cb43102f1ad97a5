"""A service's tracing shutdown is bounded: the SDK waited up to 30 s for a collector that does
not answer, at every pod stop and every `relais up` Ctrl-C. Spans given up on count as dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from services.core import telemetry as t
from services.core.config import TelemetryConfig

pytestmark = pytest.mark.unit


class _Stuck(SpanExporter):
    """An exporter whose first export hangs (a collector that stopped answering) until it is
    shut down, as the OTLP exporters' shutdown interrupts their retries."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.released.wait(60)
        self.exported += len(spans)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.released.set()


def test_the_services_span_processor_has_a_shutdown_budget_of_a_few_seconds() -> None:
    processor = t.span_processor(_Stuck())
    try:
        assert isinstance(processor, t.BoundedBatchSpanProcessor)
        assert processor.shutdown_budget == t.SPAN_SHUTDOWN_BUDGET
        # Within every pod's terminationGracePeriodSeconds beside its own drain (deploy/k8s/base).
        assert t.SPAN_SHUTDOWN_BUDGET + t.SPAN_SHUTDOWN_GRACE <= 5.0
    finally:
        processor.shutdown()  # nothing queued: returns at once


def test_jsonl_tracing_gets_the_bounded_processor_too(tmp_path: object, monkeypatch) -> None:
    installed: list[TracerProvider] = []
    monkeypatch.setattr(t, "install_provider", installed.append)
    provider = t.setup_tracing(TelemetryConfig(traces="jsonl", traces_file=f"{tmp_path}/t.jsonl"), "test")
    assert provider is not None and installed == [provider]
    try:
        processors = provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [t.BoundedBatchSpanProcessor]
    finally:
        provider.shutdown()


def test_a_hung_export_is_given_up_after_the_budget_and_its_spans_count_as_dropped() -> None:
    exporter = _Stuck()
    processor = t.BoundedBatchSpanProcessor(
        exporter, shutdown_budget=0.2, max_export_batch_size=1, schedule_delay_millis=1
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "bound"}), shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bound")
    before = t.spans_dropped()
    for _ in range(5):
        with tracer.start_as_current_span("s"):
            pass
    provider.shutdown()  # returns: the hung export was given up (else it would wait 60 s)
    assert exporter.released.is_set(), "the exporter was told to stop trying"
    deadline = time.monotonic() + 10
    while t.spans_dropped() - before < 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # what was still queued is counted as the export thread passes it
    assert t.spans_dropped() - before == 5
    assert exporter.exported <= 1, "nothing is tried once the budget is spent"


def test_a_second_shutdown_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tracer provider's atexit hook shuts its processors down again, after the service did;
    # at interpreter exit some Pythons refuse to start a thread, and every exit printed a traceback.
    processor = t.span_processor(_Stuck())
    processor.shutdown_budget = 0.1
    processor.shutdown()

    def refused(*_: object, **__: object) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(t.threading, "Thread", refused)
    processor.shutdown()

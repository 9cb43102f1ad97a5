"""relais_spans_dropped_total counts dropped spans whatever log level the service runs at."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from services.core import telemetry as t

pytestmark = pytest.mark.unit

_SDK_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export")


class _Stuck(SpanExporter):
    """An exporter that hangs (a collector that stopped answering) until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


@pytest.fixture
def quiet_root() -> Iterator[None]:
    """`relais <service> --log-level ERROR`: the root logger at ERROR."""
    yield from _root_at(logging.ERROR)


@pytest.fixture(params=[logging.INFO, logging.ERROR], ids=["info", "error"])
def any_level(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from _root_at(request.param)


def _root_at(level: int) -> Iterator[None]:
    root = logging.getLogger()
    saved_root = root.level
    saved = {name: logging.getLogger(name).level for name in _SDK_LOGGERS}
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_every_dropped_span_is_counted_at_any_log_level(any_level: None) -> None:
    # The SDK logs each drop, but its own DuplicateFilter passes one identical record per 20 s,
    # and at ERROR the record is not even made: the count came from those log records.
    t._quiet_span_drops()
    exporter = _Stuck()
    processor = BatchSpanProcessor(
        exporter, max_queue_size=2, max_export_batch_size=1, schedule_delay_millis=1
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "drops"}))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("drops")
    before = t.spans_dropped()
    try:
        for _ in range(50):
            with tracer.start_as_current_span("s"):
                pass
        # The export thread holds at most one batch; the queue keeps two: the rest was dropped.
        dropped = t.spans_dropped() - before
    finally:
        exporter.release.set()
        provider.shutdown()
    assert dropped >= 40


class _Collect(logging.Handler):
    """A handler without a level of its own, as `setup_logging` installs on the root logger."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_drop_warning_still_obeys_the_configured_level(quiet_root: None) -> None:
    t._quiet_span_drops()
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger(_SDK_LOGGERS[0]).warning("Queue full, dropping %s.", "span")
    finally:
        logging.getLogger().removeHandler(handler)
    assert handler.records == [], "counted, but not logged below the configured level"

"""One in-memory span exporter per test process (OpenTelemetry allows one global provider).

`collecting()` installs the provider the first time, then turns collection on for one test:
spans of other tests are not kept, so memory does not grow across a whole suite.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core import telemetry

_lock = threading.Lock()


class _Switch(SpanProcessor):
    """Forwards finished spans to the processors added for the current test only."""

    def __init__(self) -> None:
        self.targets: list[SpanProcessor] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        for target in list(self.targets):
            target.on_end(span)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_switch: _Switch | None = None


def _install() -> _Switch:
    global _switch
    with _lock:
        if _switch is None:
            _switch = _Switch()
            current = trace.get_tracer_provider()
            if isinstance(current, TracerProvider):
                current.add_span_processor(_switch)
                telemetry.adopt_installed_provider()
            else:
                provider = TracerProvider(resource=Resource.create({"service.name": "relais-test"}))
                provider.add_span_processor(_switch)
                telemetry.install_provider(provider)
        return _switch


@contextlib.contextmanager
def collecting(*extra: SpanExporter) -> Iterator[InMemorySpanExporter]:
    """Collect every span finished in this process (all four services) while inside."""
    switch = _install()
    exporter = InMemorySpanExporter()
    targets: list[SpanProcessor] = [SimpleSpanProcessor(exporter), *(SimpleSpanProcessor(e) for e in extra)]
    switch.targets.extend(targets)
    try:
        yield exporter
    finally:
        for target in targets:
            switch.targets.remove(target)
        exporter.clear()

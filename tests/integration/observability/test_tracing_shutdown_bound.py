"""A service stops within its tracing shutdown budget when the OTLP collector is unreachable.

The SDK's batch processor waited 30 s for its worker at shutdown while the OTLP exporter retried
a collector that refused connections or never answered: every pod stop, every Ctrl-C of
`relais up` and every service test paid it. Real OTLP/HTTP exporter, real sockets on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from services.core import telemetry as t
from services.core.embedded import free_port

# Three of the SDK's default batches (512 spans): each used to get its own export timeout.
SPANS = 3 * 512 + 10
# Generous against the budget (5 s in all), short of the 30 s the SDK's shutdown used to take.
WITHIN = 4 * (t.SPAN_SHUTDOWN_BUDGET + t.SPAN_SHUTDOWN_GRACE)


@pytest.fixture(params=["refusing", "silent"])
def collector(request: pytest.FixtureRequest) -> Iterator[str]:
    """The endpoint of a collector that is down: nothing listens there ("refusing"), or a socket
    that completes the TCP handshake (the kernel's backlog does) and never answers ("silent")."""
    if request.param == "refusing":
        yield f"http://127.0.0.1:{free_port()}/v1/traces"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/traces"


def test_shutdown_returns_within_its_budget_and_counts_what_it_could_not_export(
    collector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector)
    provider = TracerProvider(resource=Resource.create({"service.name": "stopping"}), shutdown_on_exit=False)
    provider.add_span_processor(t.span_processor(t.otlp_exporter({})))
    tracer = provider.get_tracer("stopping")
    before = t.spans_dropped()
    for _ in range(SPANS):
        with tracer.start_as_current_span("s"):
            pass
    stopping = threading.Thread(target=provider.shutdown, daemon=True)
    stopping.start()
    stopping.join(WITHIN)
    assert not stopping.is_alive(), f"shutdown still waiting for the collector after {WITHIN:.0f} s"
    # Every span is accounted for: the batch being sent when the budget ran out at once, the
    # rest as the export thread passes them without trying (a silent collector's open request
    # first has to time out, up to OTEL_EXPORTER_OTLP_TIMEOUT, 10 s).
    deadline = time.monotonic() + 30
    while t.spans_dropped() - before < SPANS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert t.spans_dropped() - before == SPANS

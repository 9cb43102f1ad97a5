"""Without a tracer provider, spans are skipped but the trace context is still carried on, as
OpenTelemetry's no-op tracer would: a service with tracing off does not break a trace that
services before and after it record."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.core import telemetry as t
from services.core.config import TelemetryConfig

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER = "00-11111111111111111111111111111111-2222222222222222-01"


@pytest.fixture
def no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a process that never set one (another test in this process may have).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(t, "_installed", False)
    assert not t.recording()


@pytest.mark.usefixtures("no_provider")
def test_publishes_while_processing_carry_the_producers_context() -> None:
    with t.consumer_span("relais.route", {"traceparent": PARENT}, {t.MESSAGE_ID: "m1"}) as span:
        assert not span.is_recording()
        assert f"{span.get_span_context().trace_id:032x}" == t.trace_id_of(PARENT)
        fresh: dict[str, str] = {}
        with t.producer_span("relais.deliver.default", fresh):
            pass
        assert fresh == {"traceparent": PARENT}
        # A publish for another message's trace keeps that trace (a DSN, a flush).
        other = {"traceparent": OTHER}
        with t.producer_span("relais.bounce", other):
            pass
        assert other == {"traceparent": OTHER}
        assert t.log_fields() == {
            "trace_id": t.trace_id_of(PARENT),
            "span_id": "b7ad6b7169203331",
            "message_id": "m1",
        }
    assert t.log_fields() == {}


@pytest.mark.usefixtures("no_provider")
def test_without_a_context_nothing_is_injected() -> None:
    headers: dict[str, str] = {}
    with t.producer_span("relais.route", headers):
        pass
    assert headers == {}
    with t.consumer_span("relais.route", None, {t.MESSAGE_ID: "m2"}):
        assert t.log_fields() == {"message_id": "m2"}
        with t.producer_span("relais.events.acme.accepted", headers):
            pass
    assert headers == {}


@pytest.mark.usefixtures("no_provider")
def test_an_error_inside_still_restores_the_context() -> None:
    with pytest.raises(RuntimeError), t.consumer_span("relais.route", {"traceparent": PARENT}):
        raise RuntimeError("handler failed")
    assert not trace.get_current_span().get_span_context().is_valid
    assert t.log_fields() == {}


@pytest.mark.usefixtures("no_provider")
def test_tracing_off_records_nothing() -> None:
    assert t.setup_tracing(TelemetryConfig(traces="none"), "router") is None
    assert not t.recording()


def test_a_provider_set_up_before_relais_still_gets_the_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    # As opentelemetry-instrument does before the service's own code runs.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", TracerProvider())
    monkeypatch.setattr(t, "_installed", False)
    assert t.setup_tracing(TelemetryConfig(traces="none"), "router") is None
    assert t.recording()

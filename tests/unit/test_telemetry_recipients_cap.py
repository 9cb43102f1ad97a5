"""An outcome's span event names its first recipients and counts them all: a message to 1,000
recipients put every address in one attribute of every outcome event (a job per domain, so a
big list at one provider was one event of ~25 KB, in each attempt's span)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core import telemetry as t
from services.core.events import Event, record_event
from tests.support.spans import collecting

pytestmark = pytest.mark.unit


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with collecting() as exporter:
        yield exporter


def _event_attributes(spans: InMemorySpanExporter, recipients: list[str]) -> dict[str, object]:
    with t.tracer().start_as_current_span("process relais.deliver.default"):
        record_event(Event("delivered", "m-cap", "acme", recipients, pool="default"))
    (span,) = [s for s in spans.get_finished_spans() if s.name == "process relais.deliver.default"]
    (event,) = [e for e in span.events if e.name == "relais.delivered"]
    return dict(event.attributes or {})


def test_a_thousand_recipients_are_named_up_to_the_cap_and_counted_in_full(spans) -> None:
    recipients = [f"user{i:04d}@big-provider.test" for i in range(1000)]
    attrs = _event_attributes(spans, recipients)
    assert attrs[t.RECIPIENTS] == ",".join(recipients[: t.RECIPIENTS_NAMED])
    assert attrs[t.RECIPIENT_COUNT] == 1000


def test_a_short_list_is_named_whole_and_counted(spans) -> None:
    attrs = _event_attributes(spans, ["a@alpha.test", "b@alpha.test"])
    assert attrs[t.RECIPIENTS] == "a@alpha.test,b@alpha.test"
    assert attrs[t.RECIPIENT_COUNT] == 2


def test_a_comma_inside_a_quoted_local_part_is_no_second_recipient(spans) -> None:
    quoted = '"last, first"@alpha.test'
    recipients = [quoted] + [f"r{i}@alpha.test" for i in range(t.RECIPIENTS_NAMED + 5)]
    attrs = _event_attributes(spans, recipients)
    assert attrs[t.RECIPIENT_COUNT] == len(recipients)
    assert attrs[t.RECIPIENTS] == ",".join(recipients[: t.RECIPIENTS_NAMED])

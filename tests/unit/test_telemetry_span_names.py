"""Span names stay a short list: a subject with an id or an account in it is named by its template.

Trace backends index span names (Jaeger's operation list per service, Tempo's span-name values):
a name per retry schedule or per DSN window grows by one per deferred job, for ever.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core import telemetry as t
from services.core.topology import (
    bounce_window_subject,
    deliver_retry_subject,
    deliver_subject,
    event_subject,
    route_retry_subject,
    route_subject,
)
from tests.support.spans import collecting

pytestmark = pytest.mark.unit


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with collecting() as exporter:
        yield exporter


def _published_as(subject: str, spans: InMemorySpanExporter) -> tuple[str, dict[str, object]]:
    spans.clear()
    with t.producer_span(subject, {}):
        pass
    (span,) = spans.get_finished_spans()
    return span.name, dict(span.attributes or {})


@pytest.mark.parametrize(
    ("subject", "name"),
    [
        (route_retry_subject("01J0ABCDEF-x", 3), "send relais.retry.route.{key}.{attempt}"),
        (deliver_retry_subject("01J0ABCDEF-x", 0), "send relais.retry.deliver.{key}.{attempt}"),
        (bounce_window_subject("01J0ABCDEF", "w1"), "send relais.bounce.window.{message_id}.{window}"),
        (event_subject("acme", "delivered"), "send relais.events.{account}.delivered"),
    ],
)
def test_a_subject_with_an_id_is_named_by_its_template(subject: str, name: str, spans) -> None:
    got, attributes = _published_as(subject, spans)
    assert got == name
    assert attributes[t.MESSAGING_DESTINATION] == subject, "the subject itself stays an attribute"
    assert attributes[t.MESSAGING_DESTINATION_TEMPLATE] == name.removeprefix("send ")


@pytest.mark.parametrize("subject", [route_subject(), deliver_subject("default"), "relais.verdict"])
def test_a_fixed_subject_is_its_own_name(subject: str, spans) -> None:
    got, attributes = _published_as(subject, spans)
    assert got == f"send {subject}"
    assert t.MESSAGING_DESTINATION_TEMPLATE not in attributes


def test_two_jobs_retried_share_one_span_name(spans) -> None:
    names = {_published_as(route_retry_subject(f"job{i}", i), spans)[0] for i in range(50)}
    assert len(names) == 1

"""Trace context survives the operator's hand: `relais requeue` and `relais bounce-queue` keep a
deferred job in its message's trace (each command runs as a real `relais` process)."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan

from services.core import telemetry as t
from tests.integration.observability.conftest import wait_for_spans
from tests.integration.observability.test_admin_cli import HOUR
from tests.integration.observability.test_traces import (
    DELIVER,
    ancestors,
    assert_connected,
    attempts_of,
    finished_with,
    queued_id,
    trace_of,
)
from tests.support.relais import asubmit, message, relais_cli, wait_for_events

SLOW_RETRIES = {"base_delay": HOUR, "max_delay": HOUR, "max_age": 5 * 24 * HOUR}


async def _deferred_once(make_stack, make_sink, recipient: str, tempfails: int) -> tuple[str, str]:
    """(NATS url, message id) of a message deferred once and due again only in an hour."""
    stack = await make_stack(retry=SLOW_RETRIES)
    make_sink("127.0.0.2").tempfail_data = tempfails
    code, reply = await asubmit(stack.smtp_address, recipients=[recipient], data=message())
    assert code == 250
    await wait_for_events(stack.config.nats.url, "deferred", 1)
    return stack.config.nats.url, queued_id(reply)


async def test_a_requeued_retry_stays_in_its_message_trace(make_stack, make_sink, spans) -> None:
    url, mid = await _deferred_once(make_stack, make_sink, "rq@alpha.test", 1)
    rc, out = await relais_cli("requeue", "alpha.test", nats_url=url)
    assert rc == 0 and "1 deferred job(s)" in out, out

    members = trace_of(await wait_for_spans(spans, finished_with(mid, "delivered"), within=30), mid)
    assert_connected(members)
    first, second = attempts_of(members, mid)
    assert first.context.span_id in {s.context.span_id for s in ancestors(second, members)}
    retry_send = [s.name for s in ancestors(second, members)][2]
    assert retry_send == "send relais.retry.route.{key}.{attempt}"


async def test_a_job_bounced_by_the_operator_stays_in_its_message_trace(
    make_stack, make_sink, sender_mx, spans
) -> None:
    url, mid = await _deferred_once(make_stack, make_sink, "bq@alpha.test", 5)
    rc, out = await relais_cli("bounce-queue", "alpha.test", "--reason", "gave up", nats_url=url)
    assert rc == 0 and "1 deferred job(s)" in out, out
    await sender_mx.async_wait_for(1, timeout=30)

    def dsn_delivered(got: list[ReadableSpan]) -> bool:
        return any(
            s.name == DELIVER and s.attributes.get(t.DSN_FOR) is None and _is_dsn_of(s, got, mid) for s in got
        )

    members = trace_of(await wait_for_spans(spans, dsn_delivered, within=30), mid)
    assert_connected(members)
    (attempt,) = attempts_of(members, mid)
    (bounce,) = [
        s for s in members if s.name == "process relais.bounce" and s.attributes.get(t.MESSAGE_ID) == mid
    ]
    assert attempt.context.span_id in {s.context.span_id for s in ancestors(bounce, members)}
    (bounced,) = [e for e in bounce.events if e.name == "relais.bounced"]
    assert bounced.attributes[t.ENHANCED_STATUS] == "5.0.0"


def _is_dsn_of(attempt: ReadableSpan, spans: list[ReadableSpan], mid: str) -> bool:
    """Whether a delivery attempt delivered the DSN about `mid`."""
    dsn_ids = {s.attributes.get(t.MESSAGE_ID) for s in spans if s.attributes.get(t.DSN_FOR) == mid}
    return attempt.attributes.get(t.MESSAGE_ID) in dsn_ids and any(
        e.name == "relais.delivered" for e in attempt.events
    )

"""One message, one trace: from the SMTP transaction through every service, retries and its DSN.

The four services run in this process, so one in-memory exporter sees every span they end.
"""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from services.core import telemetry as t
from tests.integration.bounce.conftest import wait_accepted, webhook_account
from tests.integration.observability.conftest import wait_for_spans
from tests.support.relais import RelaisStack, asubmit, message, wait_for_events

DELIVER = "process relais.deliver.default"


def queued_id(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[-1]


def trace_of(spans: list[ReadableSpan], message_id: str) -> list[ReadableSpan]:
    (root,) = [s for s in spans if s.name == "smtp receive" and s.attributes.get(t.MESSAGE_ID) == message_id]
    return [s for s in spans if s.context.trace_id == root.context.trace_id]


def assert_connected(members: list[ReadableSpan]) -> ReadableSpan:
    """Exactly one root (the SMTP transaction), and every other span's parent is in the trace."""
    ids = {s.context.span_id for s in members}
    roots = [s for s in members if s.parent is None or s.parent.span_id not in ids]
    assert [r.name for r in roots] == ["smtp receive"], [(r.name, r.parent) for r in roots]
    assert roots[0].kind is SpanKind.SERVER
    return roots[0]


def ancestors(span: ReadableSpan, members: list[ReadableSpan]) -> list[ReadableSpan]:
    by_id = {s.context.span_id: s for s in members}
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


def attempts_of(members: list[ReadableSpan], message_id: str) -> list[ReadableSpan]:
    found = [s for s in members if s.name == DELIVER and s.attributes.get(t.MESSAGE_ID) == message_id]
    return sorted(found, key=lambda s: s.attributes[t.ATTEMPT])


def finished_with(message_id: str, outcome: str, count: int = 1):  # type: ignore[no-untyped-def]
    def done(spans: list[ReadableSpan]) -> bool:
        return (
            len(
                [
                    s
                    for s in spans
                    if s.name == DELIVER
                    and s.attributes.get(t.MESSAGE_ID) == message_id
                    and any(e.name == f"relais.{outcome}" for e in s.events)
                ]
            )
            >= count
        )

    return done


async def test_a_delivered_message_is_one_connected_trace(stack: RelaisStack, make_sink, spans) -> None:
    sink = make_sink("127.0.0.2")
    code, reply = await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    await sink.async_wait_for(1)
    got = await wait_for_spans(spans, finished_with(mid, "delivered"))
    members = trace_of(got, mid)
    root = assert_connected(members)
    assert root.attributes[t.ACCOUNT] == "acme" and root.attributes[t.SENDER_DOMAIN] == "acme.test"

    (attempt,) = attempts_of(members, mid)
    chain = [s.name for s in ancestors(attempt, members)]
    assert chain == [
        "send relais.deliver.default",
        "process relais.submit",
        "send relais.submit",
        "smtp receive",
    ]
    assert attempt.kind is SpanKind.CONSUMER
    assert attempt.attributes[t.MESSAGING_SYSTEM] == "nats"
    assert attempt.attributes[t.MESSAGING_DESTINATION] == "relais.deliver.default"
    assert attempt.attributes[t.ATTEMPT] == 1
    assert attempt.attributes[t.POOL] == "default"
    assert attempt.attributes[t.SITE] in ("alpha.test", "mx.alpha.test")  # the router's choice of name
    assert attempt.attributes[t.MX_HOST]
    assert attempt.attributes[t.OUTCOME] == "delivered"
    assert attempt.attributes[t.REPLY_CODE] == 250
    (delivered,) = [e for e in attempt.events if e.name == "relais.delivered"]
    assert delivered.attributes[t.RECIPIENTS] == "r@alpha.test"
    producers = [s for s in members if s.kind is SpanKind.PRODUCER]
    assert {"send relais.events.{account}.accepted", "send relais.events.{account}.delivered"} <= {
        s.name for s in producers
    }


async def test_a_message_deferred_twice_then_delivered_is_one_trace_across_its_retries(
    stack: RelaisStack, make_sink, spans
) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 2
    code, reply = await asubmit(stack.smtp_address, recipients=["t@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    await sink.async_wait_for(1, timeout=30)
    got = await wait_for_spans(spans, finished_with(mid, "delivered"), within=30)
    members = trace_of(got, mid)
    assert_connected(members)

    first, second, third = attempts_of(members, mid)
    assert [a.attributes[t.ATTEMPT] for a in (first, second, third)] == [1, 2, 3]
    assert [a.attributes[t.REPLY_CODE] for a in (first, second, third)] == [451, 451, 250]
    assert [a.attributes[t.OUTCOME] for a in (first, second, third)] == ["deferred", "deferred", "delivered"]
    # Each retry descends from the attempt that scheduled it, through the schedule message the
    # server fired hours (here: a second) later with the headers it was stored with.
    for earlier, later in ((first, second), (second, third)):
        chain = ancestors(later, members)
        names = [s.name for s in chain]
        assert names[:3] == ["send relais.deliver.default", "process relais.route", names[2]]
        assert names[2] == "send relais.retry.route.{key}.{attempt}", names
        assert chain[3] is earlier or chain[3].context.span_id == earlier.context.span_id
    # Routed first as new mail, then twice as retries.
    assert [s.name for s in members].count("process relais.submit") == 1
    assert [s.name for s in members].count("process relais.route") == 2


async def test_a_bounced_message_and_its_dsn_are_one_trace(
    stack: RelaisStack, make_sink, sender_mx, spans
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": "550 5.1.1 <gone@alpha.test>: Recipient address rejected"}
    code, reply = await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    await sender_mx.async_wait_for(1, timeout=30)
    await wait_for_events(stack.config.nats.url, "bounced", 1)

    def dsn_delivered(spans: list[ReadableSpan]) -> bool:
        bounce = [
            s for s in spans if s.name == "process relais.bounce" and s.attributes.get(t.MESSAGE_ID) == mid
        ]
        if not bounce or "relais.dsn_id" not in bounce[0].attributes:
            return False
        return finished_with(str(bounce[0].attributes["relais.dsn_id"]), "delivered")(spans)

    got = await wait_for_spans(spans, dsn_delivered, within=30)
    members = trace_of(got, mid)
    assert_connected(members)

    (attempt,) = attempts_of(members, mid)
    assert attempt.attributes[t.OUTCOME] == "bounced"
    assert attempt.attributes[t.REPLY_CODE] == 550
    assert attempt.attributes[t.ENHANCED_STATUS] == "5.1.1"
    (bounce,) = [s for s in members if s.name == "process relais.bounce"]
    assert bounce.kind is SpanKind.CONSUMER
    assert attempt in ancestors(bounce, members) or attempt.context.span_id in {
        s.context.span_id for s in ancestors(bounce, members)
    }
    (bounced,) = [e for e in bounce.events if e.name == "relais.bounced"]
    assert bounced.attributes[t.REPLY_CODE] == 550
    assert bounced.attributes[t.ENHANCED_STATUS] == "5.1.1"
    assert bounce.attributes[t.REPLY_CODE] == 550

    # The DSN is a message of its own (own id, pointing back with dsn_for) in the same trace:
    # an operator following the bounce sees the DSN's routing and delivery under it.
    dsn_id = str(bounce.attributes["relais.dsn_id"])
    (dsn_send,) = [s for s in members if s.attributes.get(t.DSN_FOR) == mid]
    assert dsn_send.attributes[t.MESSAGE_ID] == dsn_id
    assert bounce.context.span_id in {s.context.span_id for s in ancestors(dsn_send, members)}
    (dsn_attempt,) = attempts_of(members, dsn_id)
    assert dsn_attempt.attributes[t.OUTCOME] == "delivered"
    assert dsn_send.context.span_id in {s.context.span_id for s in ancestors(dsn_attempt, members)}


async def test_a_webhook_post_is_linked_to_the_trace_of_each_message_it_reports(
    make_stack, make_sink, receiver, spans
) -> None:
    stack = await make_stack(accounts=webhook_account(receiver.url))
    sink = make_sink("127.0.0.2")
    code, reply = await asubmit(stack.smtp_address, recipients=["w@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    await sink.async_wait_for(1)
    await wait_accepted(receiver, 2)  # the accepted and the delivered event

    def linked(spans: list[ReadableSpan]) -> bool:
        return sum(len(s.links) for s in spans if s.name == "webhook post") >= 2

    got = await wait_for_spans(spans, linked)
    trace_id = trace_of(got, mid)[0].context.trace_id
    posts = [s for s in got if s.name == "webhook post"]
    assert posts and all(p.parent is None for p in posts), "a batch is a trace of its own"
    assert all(p.context.trace_id != trace_id for p in posts)
    linked_traces = [link.context.trace_id for p in posts for link in p.links]
    assert linked_traces.count(trace_id) >= 2
    assert all(p.attributes[t.ACCOUNT] == "acme" for p in posts)
    assert {p.attributes["http.response.status_code"] for p in posts} == {200}


async def test_a_deferred_attempt_carries_its_deferred_event(stack: RelaisStack, make_sink, spans) -> None:
    # The event is published in the background, after the attempt's span ended: it must be
    # recorded on the span before that, as `accepted` is at the ingress.
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    code, reply = await asubmit(stack.smtp_address, recipients=["d@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    got = await wait_for_spans(spans, finished_with(mid, "delivered"), within=30)
    first, second = attempts_of(trace_of(got, mid), mid)
    (deferred,) = [e for e in first.events if e.name == "relais.deferred"]
    assert deferred.attributes[t.REPLY_CODE] == 451
    assert deferred.attributes[t.RECIPIENTS] == "d@alpha.test"
    assert deferred.attributes[t.ATTEMPT] == 1
    (delivered,) = [e for e in second.events if e.name == "relais.delivered"]
    assert delivered.attributes[t.ATTEMPT] == 2, "numbered like the deferral before it"


async def test_a_job_the_router_bounces_is_settled_in_the_same_trace(stack: RelaisStack, spans) -> None:
    code, reply = await asubmit(stack.smtp_address, recipients=["x@no-such-domain.test"], data=message())
    assert code == 250
    mid = queued_id(reply)

    def bounced(spans: list[ReadableSpan]) -> bool:
        return any(s.name == "process relais.bounce" and s.attributes.get(t.MESSAGE_ID) == mid for s in spans)

    members = trace_of(await wait_for_spans(spans, bounced, within=30), mid)
    assert_connected(members)
    (route,) = [
        s for s in members if s.name == "process relais.submit" and s.attributes.get(t.MESSAGE_ID) == mid
    ]
    (verdict,) = [s for s in members if s.name == "process relais.verdict"]
    (bounce,) = [
        s for s in members if s.name == "process relais.bounce" and s.attributes.get(t.MESSAGE_ID) == mid
    ]
    assert verdict.kind is SpanKind.CONSUMER
    assert route in ancestors(verdict, members)
    assert verdict in ancestors(bounce, members)

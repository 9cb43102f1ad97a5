"""An outcome on the trace says what the MX said, not only its codes: "451 4.7.1" alone does not
tell greylisting from a blocklist, which Postfix's `status=deferred (host ... said: ...)` does."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from services.admin.trace import render_tree
from services.core import telemetry as t
from tests.integration.bounce.conftest import wait_accepted, webhook_account
from tests.integration.observability.conftest import wait_for_spans
from tests.integration.observability.test_traces import attempts_of, finished_with, queued_id, trace_of
from tests.support.relais import RelaisStack, asubmit, message

GREYLISTED = "451 4.7.1 Greylisted by mx.alpha.test, please try again in 60 seconds"


async def test_a_deferred_attempt_carries_the_mx_reply_text(stack: RelaisStack, make_sink, spans) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    sink.tempfail_reply = GREYLISTED
    code, reply = await asubmit(stack.smtp_address, recipients=["g@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    got = await wait_for_spans(spans, finished_with(mid, "delivered"), within=30)
    first, _ = attempts_of(trace_of(got, mid), mid)
    (deferred,) = [e for e in first.events if e.name == "relais.deferred"]
    assert deferred.attributes[t.REPLY_CODE] == 451
    assert "Greylisted by mx.alpha.test" in str(deferred.attributes.get(t.REPLY_TEXT, ""))
    assert "Greylisted by mx.alpha.test" in str(first.attributes.get(t.REPLY_TEXT, ""))

    # `relais trace` prints it under the attempt, as `relais message` does.
    record = t.span_record(first)
    assert "Greylisted by mx.alpha.test" in render_tree([record])


def test_a_long_reply_text_is_cut_on_the_span_event() -> None:
    from services.core.events import Event, outcome_attributes

    event = Event(
        "bounced",
        "m1",
        "acme",
        ["x@alpha.test"],
        reply={"code": 550, "enhanced": "5.7.1", "text": "blocked " + "x" * 10_000},
    )
    text = str(outcome_attributes(event)[t.REPLY_TEXT])
    assert text.startswith("blocked ") and len(text) <= t.REPLY_TEXT_MAX


def test_a_reply_text_stays_with_its_own_codes_on_the_span(spans) -> None:
    # An attempt that delivered one recipient and deferred another: the span's reply attributes
    # (set by delivery from the first outcome) must not get the text of the other reply.
    with t.consumer_span("relais.deliver.default", {}, {t.MESSAGE_ID: "m3"}):
        t.record_reply(250, "2.0.0")
        t.annotate_outcome(
            "deferred", {t.REPLY_CODE: 452, t.ENHANCED_STATUS: "4.2.2", t.REPLY_TEXT: "mailbox full"}
        )
        t.annotate_outcome(
            "delivered", {t.REPLY_CODE: 250, t.ENHANCED_STATUS: "2.0.0", t.REPLY_TEXT: "queued"}
        )
    (span,) = spans.get_finished_spans()
    assert span.attributes[t.REPLY_CODE] == 250
    assert span.attributes[t.REPLY_TEXT] == "queued"
    assert [e.attributes[t.REPLY_TEXT] for e in span.events] == ["mailbox full", "queued"]


async def test_a_webhook_post_the_receiver_refused_is_an_error_span(
    make_stack, make_sink, receiver, spans
) -> None:
    # OpenTelemetry's HTTP conventions: a client span whose response is 4xx or 5xx has status
    # Error, so a trace backend's error filter finds the failed posts (the retries follow).
    receiver.fail_first = 1
    stack = await make_stack(accounts=webhook_account(receiver.url))
    sink = make_sink("127.0.0.2")
    code, _ = await asubmit(stack.smtp_address, recipients=["w@alpha.test"], data=message())
    assert code == 250
    await sink.async_wait_for(1)
    await wait_accepted(receiver, 2)

    def posted(spans: list[ReadableSpan]) -> bool:
        return {s.attributes.get("http.response.status_code") for s in spans if s.name == "webhook post"} >= {
            200,
            500,
        }

    got = await wait_for_spans(spans, posted)
    posts = [s for s in got if s.name == "webhook post"]
    by_status = {s.attributes["http.response.status_code"]: s.status.status_code for s in posts}
    assert by_status == {500: StatusCode.ERROR, 200: StatusCode.UNSET}

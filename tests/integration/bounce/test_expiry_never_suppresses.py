"""One round in which one recipient's MX says 550 and another's retries run out: each gets its
own event, and only the real 5xx suppresses. An expiry's last temporary reply ("450 4.1.1 User
unknown") reads like a dead address, but it was an MX saying "not now"."""

from __future__ import annotations

from services.core import metrics
from tests.integration.bounce.conftest import suppression_entry
from tests.support.relais import ACCOUNT, asubmit, message, wait_for_events

USER_UNKNOWN = "550 5.1.1 <gone@alpha.test>: Recipient address rejected: User unknown"
NOT_NOW = "450 4.1.1 <later@alpha.test>: Recipient address rejected: User unknown"


async def test_an_expired_recipient_is_not_suppressed_and_a_bounced_one_is(
    make_stack, make_sink, sender_mx
) -> None:
    # The retry is cut to max_age (1 s), and expires then; the DSN window outlasts it, so one
    # DSN reports both recipients.
    stack = await make_stack(
        retry={"base_delay": 60.0, "max_delay": 60.0, "max_age": 1.0}, bounce={"dsn_window": 5.0}
    )
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": USER_UNKNOWN, "later@alpha.test": NOT_NOW}
    recipients = ["gone@alpha.test", "later@alpha.test"]
    before = {c: _bounces("default", c) for c in ("invalid_recipient", "message_expired")}
    assert (await asubmit(stack.smtp_address, recipients=recipients, data=message()))[0] == 250

    (bounced,) = await wait_for_events(url, "bounced", 1)
    (expired,) = await wait_for_events(url, "expired", 1)
    assert bounced.recipients == ["gone@alpha.test"]
    assert bounced.detail["category"] == "invalid_recipient" and bounced.detail["suppressed"] == "true"
    assert expired.recipients == ["later@alpha.test"]
    assert expired.reply is not None and expired.reply["enhanced"] == "4.4.7"
    assert expired.detail["category"] == "message_expired"
    assert "suppressed" not in expired.detail
    # The metric is labelled with the event's category (the services run in this process).
    assert bounced.pool == expired.pool == "default"
    assert {c: _bounces("default", c) - n for c, n in before.items()} == {
        "invalid_recipient": 1,
        "message_expired": 1,
    }
    assert await suppression_entry(url, ACCOUNT, "gone@alpha.test") is not None
    assert await suppression_entry(url, ACCOUNT, "later@alpha.test") is None
    (dsn,) = await sender_mx.async_wait_for(1)
    assert b"Status: 5.1.1" in dsn.data and b"Status: 4.4.7" in dsn.data


def _bounces(pool: str, category: str) -> float:
    labels = {"pool": pool, "bounce_category": category}
    return metrics.REGISTRY.get_sample_value("relais_bounces_total", labels) or 0.0

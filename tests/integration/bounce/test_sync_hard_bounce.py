"""A 5xx from the recipient's MX: classified, suppressed if the address is dead, and the next
message to it is dropped by the router instead of sent."""

from __future__ import annotations

from tests.integration.bounce.conftest import suppression_entry, wait_settled
from tests.support.relais import ACCOUNT, RelaisStack, asubmit, message, read_events, wait_for_events

USER_UNKNOWN = "550 5.1.1 <gone@alpha.test>: Recipient address rejected: User unknown"
SPAM_REJECT = "550 5.7.1 Message rejected: likely unsolicited mail"


async def test_user_unknown_is_suppressed_and_the_next_message_is_not_sent(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": USER_UNKNOWN}
    assert (await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=message()))[0] == 250

    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.detail["category"] == "invalid_recipient"
    assert bounced.detail["suppressed"] == "true"
    entry = await suppression_entry(url, ACCOUNT, "Gone@Alpha.test")
    assert entry is not None and entry.reason == "hard_bounce" and entry.category == "invalid_recipient"
    assert entry.source == bounced.message_id
    (dsn,) = await sender_mx.async_wait_for(1)
    assert b"Status: 5.1.1" in dsn.data

    code, _ = await asubmit(
        stack.smtp_address, recipients=["gone@alpha.test", "here@alpha.test"], data=message(subject="Again")
    )
    assert code == 250
    (suppressed,) = await wait_for_events(url, "suppressed", 1)
    assert suppressed.recipients == ["gone@alpha.test"]
    (delivered,) = await sink.async_wait_for(1)
    assert delivered.rcpt_tos == ["here@alpha.test"], "only the live address is sent to"
    await wait_settled(url)
    assert len([e for e in await read_events(url) if e.kind == "bounced"]) == 1
    assert len(sender_mx.messages) == 1, "a suppressed recipient is not a bounce: no second DSN"


async def test_a_spam_rejection_is_classified_but_does_not_suppress_the_address(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.data_reply = SPAM_REJECT
    assert (await asubmit(stack.smtp_address, recipients=["reader@alpha.test"], data=message()))[0] == 250
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.detail["category"] == "spam_content"
    assert "suppressed" not in bounced.detail
    assert await suppression_entry(url, ACCOUNT, "reader@alpha.test") is None

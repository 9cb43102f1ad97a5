"""An out-of-office reply to the return path (RFC 3834 sends automatic replies there) is no
bounce: it once came out one whenever it named its address between commas, read by flufl.bounce's
detector for one laboratory's sendmail, and its words about the mailbox then had it suppressed."""

from __future__ import annotations

from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import (
    mail_over_smtp,
    stack_with_inbound_listener,
    suppression_entry,
    wait_consumed,
    wait_settled,
)
from tests.support.relais import ACCOUNT, asubmit, message, read_events


def out_of_office(to: str) -> bytes:
    """What a vacation responder sends: from the recipient, marked as RFC 3834 asks."""
    return (
        "From: Jane Doe <jane@alpha.test>\r\n"
        f"To: <{to}>\r\n"
        "Subject: Automatic reply: Hello\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "X-Auto-Response-Suppress: All\r\n"
        "\r\n"
        "Thank you for your message. I have left Alpha for a year; this mailbox, jane@alpha.test, is\r\n"
        "no longer active until I return. Please write to the front desk meanwhile.\r\n"
    ).encode()


async def test_an_out_of_office_reply_is_no_bounce_and_the_next_message_goes_out(
    make_stack, make_sink
) -> None:
    stack, inbound = await stack_with_inbound_listener(make_stack)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    assert (await asubmit(stack.smtp_address, recipients=["jane@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)

    await mail_over_smtp(inbound, sent.mail_from, out_of_office(sent.mail_from))
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)

    assert not [e for e in await read_events(url) if e.kind in ("bounced", "complained")]
    assert await suppression_entry(url, ACCOUNT, "jane@alpha.test") is None
    # What the sender sees: jane still gets the next newsletter.
    assert (await asubmit(stack.smtp_address, recipients=["jane@alpha.test"], data=message()))[0] == 250
    await sink.async_wait_for(2)
    await wait_settled(url)
    assert not [e for e in await read_events(url) if e.kind == "suppressed"]

"""Only reports are exempt from DSNs (RFC 3461 section 6.2): a failed delivery report or MDN
gets none, but automatic mail from a sender (Auto-Submitted: auto-generated, e.g. receipts
sent from a VERP return path) does, as Postfix does. Loops end at the null reverse-path."""

from __future__ import annotations

import email

from flufl.bounce import all_failures

from tests.integration.bounce.conftest import wait_settled
from tests.support.relais import RelaisStack, asubmit, message, wait_for_events

REJECT = "550 5.1.1 No such user"


async def test_auto_generated_mail_from_a_sender_gets_a_dsn(stack: RelaisStack, make_sink, sender_mx) -> None:
    make_sink("127.0.0.2").rcpt_default = REJECT
    data = b"Auto-Submitted: auto-generated\r\n" + message(subject="Your receipt")
    assert (await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=data))[0] == 250

    (dsn,) = await sender_mx.async_wait_for(1)
    _, permanent = all_failures(email.message_from_bytes(dsn.data))
    assert permanent == {b"gone@alpha.test"}
    assert b"Subject: Your receipt" in dsn.data


async def test_a_disposition_report_gets_no_dsn(stack: RelaisStack, make_sink, sender_mx) -> None:
    make_sink("127.0.0.2").rcpt_default = REJECT
    data = (
        b"From: news@acme.test\r\nTo: someone@alpha.test\r\nSubject: Read: Hello\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nDisplayed.\r\n--b--\r\n"
    )
    assert (await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=data))[0] == 250

    await wait_for_events(stack.config.nats.url, "bounced", 1)
    await wait_settled(stack.config.nats.url)
    assert sender_mx.messages == []

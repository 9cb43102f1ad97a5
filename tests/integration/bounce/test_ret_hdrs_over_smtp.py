"""RFC 3461 parameters given over SMTP reach the DSN: RET=HDRS wins over `bounce.return_full`
(headers only come back, never the body), and ENVID and ORCPT come back xtext-decoded as
Original-Envelope-Id and Original-Recipient."""

from __future__ import annotations

import email

from tests.support.relais import asubmit, message

REJECT = "550 5.1.1 No such user here"
SECRET_LINE = "This body line must not come back with RET=HDRS."


async def test_ret_hdrs_returns_headers_only_even_when_full_returns_are_the_default(
    make_stack, make_sink, sender_mx
) -> None:
    make_sink("127.0.0.2").rcpt_default = REJECT
    stack = await make_stack(bounce={"return_full": True})
    code, _ = await asubmit(
        stack.smtp_address,
        recipients=["bob@alpha.test"],
        data=message(subject="Headers only", body=SECRET_LINE + "\r\n"),
        mail_options=["RET=HDRS", "ENVID=batch+2B7"],
        rcpt_options={"bob@alpha.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;Bob+2Bnews@Alpha.test"]},
    )
    assert code == 250

    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    types = [p.get_content_type() for p in parsed.walk()]
    assert "text/rfc822-headers" in types and "message/rfc822" not in types
    assert SECRET_LINE.encode() not in dsn.data
    assert b"Subject: Headers only" in dsn.data
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    per_message, bob = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "batch+7"
    assert bob["Original-Recipient"] == "rfc822; Bob+news@Alpha.test"
    assert bob["Final-Recipient"] == "rfc822; bob@alpha.test"


async def test_without_ret_the_configured_full_return_applies(make_stack, make_sink, sender_mx) -> None:
    make_sink("127.0.0.2").rcpt_default = REJECT
    stack = await make_stack(bounce={"return_full": True})
    body = "This body line comes back whole.\r\n"
    code, _ = await asubmit(stack.smtp_address, recipients=["bob@alpha.test"], data=message(body=body))
    assert code == 250

    (dsn,) = await sender_mx.async_wait_for(1)
    parts = email.message_from_bytes(dsn.data).walk()
    returned = next(p for p in parts if p.get_content_type() == "message/rfc822")
    assert body.strip().encode() in returned.as_bytes()

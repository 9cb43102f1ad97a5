"""An expiry's Diagnostic-Code says Relais wrote it.

"554 4.4.7 Message expired ...; last reply: 450 ..." is Relais' own verdict, not an MX's reply.
Typed `smtp;` (taken from the stage of the last temporary reply), it told the sender's bounce
processor that the MX had answered 554, a permanent refusal, with the MX's "User unknown"
next to it: Postfix types its own reasons `X-Postfix;`, Relais `x-relais;`."""

from __future__ import annotations

import email

from services.bounce.dsn import DIAGNOSTIC_LOCAL, DIAGNOSTIC_SMTP
from tests.support.relais import asubmit, message

NOT_NOW = "450 4.1.1 <later@alpha.test>: Recipient address rejected: User unknown"
GONE = "550 5.1.1 <gone@alpha.test>: Recipient address rejected: User unknown"


async def test_an_expiry_is_reported_as_relais_own_diagnostic(make_stack, make_sink, sender_mx) -> None:
    # The retry is cut to max_age (1 s), and expires then; the DSN window outlasts it, so one
    # DSN reports both recipients.
    stack = await make_stack(
        retry={"base_delay": 60.0, "max_delay": 60.0, "max_age": 1.0}, bounce={"dsn_window": 5.0}
    )
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": GONE, "later@alpha.test": NOT_NOW}
    recipients = ["gone@alpha.test", "later@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=recipients, data=message()))[0] == 250

    (dsn,) = await sender_mx.async_wait_for(1)
    status = next(
        p
        for p in email.message_from_bytes(dsn.data).walk()
        if p.get_content_type() == "message/delivery-status"
    )
    blocks = {b["Final-Recipient"]: b for b in status.get_payload()[1:]}
    expired = " ".join(blocks["rfc822; later@alpha.test"]["Diagnostic-Code"].split())
    assert expired.startswith(f"{DIAGNOSTIC_LOCAL}; 554 4.4.7 "), expired
    assert "last reply: 450 4.1.1" in expired
    bounced = " ".join(blocks["rfc822; gone@alpha.test"]["Diagnostic-Code"].split())
    assert bounced == f"{DIAGNOSTIC_SMTP}; {GONE}"

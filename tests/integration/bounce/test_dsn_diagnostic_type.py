"""A DSN says who wrote each diagnostic: `smtp;` for a reply an MX gave, `x-relais;` for one
Relais made itself (null MX here), as Postfix writes `X-Postfix;`. The per-message fields come
in RFC 3464 section 2.2's order, Original-Envelope-Id first."""

from __future__ import annotations

import email

from services.core.envelope import Envelope
from services.core.outcome import NULL_MX
from tests.integration.bounce.conftest import publish_submission
from tests.support.relais import RelaisStack, an_envelope, message

REJECT = "550 5.1.1 No such user"


def envelope(recipient: str, envid: str) -> Envelope:
    return an_envelope(recipient, body=message(subject=envid), dsn_envid=envid)


def _unfolded(value: str) -> str:
    return " ".join(value.split())


async def test_diagnostic_type_names_who_made_the_reply(
    stack: RelaisStack, zone, make_sink, sender_mx
) -> None:
    zone.add("nullmx.test", "MX", "0 .")
    make_sink("127.0.0.2").rcpt_default = REJECT
    await publish_submission(stack.config.nats.url, envelope("n@nullmx.test", "local-1"))
    await publish_submission(stack.config.nats.url, envelope("bob@alpha.test", "remote-1"))

    dsns = await sender_mx.async_wait_for(2)
    blocks = {}
    for dsn in dsns:
        status = next(
            p
            for p in email.message_from_bytes(dsn.data).walk()
            if p.get_content_type() == "message/delivery-status"
        )
        per_message, per_recipient = status.get_payload()
        assert list(per_message.keys())[:2] == ["Original-Envelope-Id", "Reporting-MTA"]
        blocks[per_message["Original-Envelope-Id"]] = per_recipient

    assert _unfolded(blocks["local-1"]["Diagnostic-Code"]) == f"x-relais; {NULL_MX}"
    assert blocks["local-1"]["Remote-MTA"] is None
    assert _unfolded(blocks["remote-1"]["Diagnostic-Code"]) == f"smtp; {REJECT}"
    assert blocks["remote-1"]["Remote-MTA"] == "dns; mx.alpha.test"

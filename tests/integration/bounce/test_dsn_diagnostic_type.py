"""A DSN says who wrote each diagnostic: `smtp;` for a reply an MX gave, `x-relais;` for one
Relais made itself (null MX here), as Postfix writes `X-Postfix;`. The per-message fields come
in RFC 3464 section 2.2's order, Original-Envelope-Id first."""

from __future__ import annotations

import email

from services.core.envelope import BodyRef, Envelope, new_message_id
from services.core.outcome import NULL_MX
from tests.integration.bounce.conftest import publish_route
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, RelaisStack, message

REJECT = "550 5.1.1 No such user"


def envelope(recipient: str, envid: str) -> Envelope:
    data = message(subject=envid)
    return Envelope(
        id=new_message_id(),
        sender=f"news@{SENDER_DOMAIN}",
        recipients=(recipient,),
        account=ACCOUNT,
        sender_domain=SENDER_DOMAIN,
        body=BodyRef(size=len(data), inline=data),
        dsn_envid=envid,
    )


def _unfolded(value: str) -> str:
    return " ".join(value.split())


async def test_diagnostic_type_names_who_made_the_reply(
    stack: RelaisStack, zone, make_sink, sender_mx
) -> None:
    zone.add("nullmx.test", "MX", "0 .")
    make_sink("127.0.0.2").rcpt_default = REJECT
    await publish_route(stack.config.nats.url, envelope("n@nullmx.test", "local-1"))
    await publish_route(stack.config.nats.url, envelope("bob@alpha.test", "remote-1"))

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

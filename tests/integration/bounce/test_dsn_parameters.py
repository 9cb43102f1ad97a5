"""RFC 3461 at the bounce service: NOTIFY=NEVER silences a recipient, ORCPT becomes
Original-Recipient, RET=FULL returns the whole message, ENVID comes back.

The envelopes are published to the router's subject exactly as the ingress does, with the
per-recipient parameters the ingress records at RCPT."""

from __future__ import annotations

import asyncio
import email

from flufl.bounce import all_failures

from services.core.envelope import Envelope
from tests.integration.bounce.conftest import publish_route
from tests.support.relais import SENDER_DOMAIN, RelaisStack, an_envelope, message, wait_for_events

SENDER = f"news@{SENDER_DOMAIN}"
REJECT = "550 5.1.1 No such user"


def envelope(recipients: tuple[str, ...], data: bytes, **dsn: object) -> Envelope:
    return an_envelope(*recipients, body=data, **dsn)


async def test_notify_orcpt_ret_and_envid_shape_the_dsn(stack: RelaisStack, make_sink, sender_mx) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = REJECT
    data = message(subject="Parameters", body="The body travels back with RET=FULL.\r\n")
    env = envelope(
        ("quiet@alpha.test", "orig@alpha.test", "plain@alpha.test"),
        data,
        dsn_notify={"quiet@alpha.test": "NEVER", "orig@alpha.test": "FAILURE,DELAY"},
        dsn_orcpt={"orig@alpha.test": "rfc822;Original.Name@alpha.test"},
        dsn_ret="FULL",
        dsn_envid="campaign-42",
    )
    await publish_route(stack.config.nats.url, env)

    bounced = await wait_for_events(stack.config.nats.url, "bounced", 3)
    assert {r for e in bounced for r in e.recipients} == set(env.recipients), "events ignore NOTIFY"
    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    _, permanent = all_failures(parsed)
    assert b"quiet@alpha.test" not in permanent
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert blocks[0]["Original-Envelope-Id"] == "campaign-42"
    finals = {b["Final-Recipient"]: b for b in blocks[1:]}
    assert set(finals) == {"rfc822; orig@alpha.test", "rfc822; plain@alpha.test"}
    assert finals["rfc822; orig@alpha.test"]["Original-Recipient"] == "rfc822; Original.Name@alpha.test"
    assert finals["rfc822; plain@alpha.test"]["Original-Recipient"] is None
    returned = next(p for p in parsed.walk() if p.get_content_type() == "message/rfc822")
    assert b"The body travels back with RET=FULL." in returned.as_bytes()


async def test_notify_never_for_every_recipient_sends_no_dsn(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = REJECT
    env = envelope(("a@alpha.test",), message(), dsn_notify={"a@alpha.test": "NEVER"})
    await publish_route(stack.config.nats.url, env)
    await wait_for_events(stack.config.nats.url, "bounced", 1)
    await asyncio.sleep(1.5)
    assert sender_mx.messages == []


async def test_an_orcpt_or_envid_with_a_line_break_is_left_out_of_a_dsn_that_still_goes(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    # Queued before the ingress refused such values: the DSN must not be refused forever.
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = REJECT
    injected = "rfc822;orig@alpha.test\r\nBcc: victim@beta.test"
    env = envelope(
        ("orig@alpha.test",), message(), dsn_orcpt={"orig@alpha.test": injected}, dsn_envid="id\r\nX-Evil: 1"
    )
    await publish_route(stack.config.nats.url, env)

    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert blocks[0]["Original-Envelope-Id"] is None
    assert blocks[1]["Final-Recipient"] == "rfc822; orig@alpha.test"
    assert blocks[1]["Original-Recipient"] is None
    assert b"victim@beta.test" not in dsn.data and b"X-Evil" not in dsn.data

"""A DSN that bounces ends there: the sender's MX refusing the DSN gives a `bounced` event for
it and nothing more: no DSN about the DSN (it has the null reverse-path, RFC 5321 4.5.5), no
second attempt, and no suppression of the sender's address (a DSN failing says something about
a sender, not a recipient). The original recipient's hard bounce still suppresses it."""

from __future__ import annotations

from tests.integration.bounce.conftest import suppression_entry, wait_settled
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, asubmit, message, read_events, wait_for_events

REJECT = "550 5.1.1 No such user here"
SENDER = f"news@{SENDER_DOMAIN}"


async def test_a_bounced_dsn_gets_no_dsn_and_suppresses_no_one(stack, make_sink, sender_mx) -> None:
    make_sink("127.0.0.2").rcpt_default = REJECT
    sender_mx.rcpt_default = REJECT
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=message()))[0] == 250

    bounced = await wait_for_events(url, "bounced", 2)
    assert sorted(r for e in bounced for r in e.recipients) == sorted(["gone@alpha.test", SENDER])
    await wait_settled(url)  # a DSN about the DSN, or a retry of it, would have come by now
    assert sender_mx.messages == []
    assert sender_mx.connections == 1, "the DSN was tried once and never reported on"
    events = await read_events(url)
    assert len([e for e in events if e.kind == "bounced"]) == 2
    assert not [e for e in events if e.kind in ("deferred", "expired")]
    assert await suppression_entry(url, ACCOUNT, SENDER) is None
    assert await suppression_entry(url, ACCOUNT, "gone@alpha.test") is not None

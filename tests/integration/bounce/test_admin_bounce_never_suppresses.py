"""`relais bounce-queue` is the operator's decision about a queue, not an MX's verdict about an
address: its recipients get their DSN and `bounced` event, and stay off the suppression list
whatever the free-text reason says. The reason is only text for the DSN; read by the bounce
classifier, "mailbox unavailable for maintenance" is an invalid recipient, and every address
of the site was suppressed for good. (KumoMTA logs such bounces as `AdminBounce` records, apart
from the `Bounce` records a suppression list is built from; `relais suppression add` is how an
operator suppresses an address.)"""

from __future__ import annotations

from tests.integration.bounce.conftest import suppression_entry
from tests.support.relais import ACCOUNT, asubmit, message, relais_cli, wait_for_events

HOUR = 3600.0
# What the classifier reads as a dead mailbox ("mailbox unavailable" on a 5xx).
REASON = "site down: mailbox unavailable for maintenance"


async def test_an_admin_bounce_sends_its_dsn_and_suppresses_no_one(make_stack, make_sink, sender_mx) -> None:
    stack = await make_stack(retry={"base_delay": HOUR, "max_delay": HOUR, "max_age": 5 * 24 * HOUR})
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 5
    code, _ = await asubmit(stack.smtp_address, recipients=["fine@alpha.test"], data=message())
    assert code == 250
    await wait_for_events(url, "deferred", 1)

    rc, out = await relais_cli("bounce-queue", "alpha.test", "--reason", REASON, nats_url=url)
    assert rc == 0 and "1 deferred job(s) for alpha.test bounced" in out, out

    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.recipients == ["fine@alpha.test"]
    assert bounced.reply is not None and REASON in bounced.reply["text"]
    assert "suppressed" not in bounced.detail, bounced.detail
    assert await suppression_entry(url, ACCOUNT, "fine@alpha.test") is None
    (dsn,) = await sender_mx.async_wait_for(1, timeout=20)
    assert b"Status: 5.0.0" in dsn.data

"""A bounce that arrives later, at the VERP return path: mapped back to account, message and
recipient through the token, the address suppressed, the next message to it not sent."""

from __future__ import annotations

from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import (
    RETURN_DOMAIN,
    VERP,
    bounce_over_smtp,
    publish_inbound,
    stack_with_inbound_listener,
    suppression_entry,
    wait_consumed,
    wait_settled,
)
from tests.support.bounce_samples import exim_bounce, postfix_dsn
from tests.support.relais import ACCOUNT, asubmit, message, read_events, wait_for_events


async def test_async_dsn_suppresses_and_the_next_message_is_not_sent(make_stack, make_sink) -> None:
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    assert (await asubmit(stack.smtp_address, recipients=["later@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)
    assert sent.mail_from.startswith(f"b+{ACCOUNT}.") and sent.mail_from.endswith(f"@{RETURN_DOMAIN}")
    (delivered,) = await wait_for_events(url, "delivered", 1)

    # Days later the recipient's system bounces after all, to the return path it was given.
    await publish_inbound(url, postfix_dsn(to=sent.mail_from, recipient="later@alpha.test"), [sent.mail_from])
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert (bounced.message_id, bounced.account, bounced.recipients) == (
        delivered.message_id,
        ACCOUNT,
        ["later@alpha.test"],
    )
    assert bounced.detail["source"] == "async" and bounced.detail["category"] == "invalid_recipient"
    entry = await suppression_entry(url, ACCOUNT, "later@alpha.test")
    assert entry is not None and entry.reason == "hard_bounce" and entry.source == delivered.message_id

    assert (await asubmit(stack.smtp_address, recipients=["later@alpha.test"], data=message()))[0] == 250
    await wait_for_events(url, "suppressed", 1)
    await wait_settled(url)
    assert len(sink.messages) == 1, "the suppressed address got nothing more"


async def test_multi_recipient_job_exim_bounce_maps_to_the_named_recipient(make_stack, make_sink) -> None:
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.3")
    rcpts = ["one@beta.test", "two@beta.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)
    assert sorted(sent.rcpt_tos) == rcpts
    await publish_inbound(url, exim_bounce(to=sent.mail_from, recipient="two@beta.test"), [sent.mail_from])
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.recipients == ["two@beta.test"] and bounced.detail["format"] == "heuristic"
    assert await suppression_entry(url, ACCOUNT, "two@beta.test") is not None
    assert await suppression_entry(url, ACCOUNT, "one@beta.test") is None


async def test_bounce_over_smtp_to_the_inbound_listener(make_stack, make_sink) -> None:
    """End to end: the remote MTA's bounce arrives on the ingress's port-25-style listener."""
    stack, inbound = await stack_with_inbound_listener(make_stack)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    assert (await asubmit(stack.smtp_address, recipients=["smtp@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)

    await bounce_over_smtp(inbound, sent.mail_from, "smtp@alpha.test")
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.recipients == ["smtp@alpha.test"] and bounced.detail["source"] == "async"
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)
    assert await suppression_entry(url, ACCOUNT, "smtp@alpha.test") is not None
    assert not [e for e in await read_events(url) if e.kind == "complained"]

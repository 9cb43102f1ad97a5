"""Outcome rewrite rules: the default set treats a "mailbox full" 5xx as temporary (retried, not bounced)."""

from __future__ import annotations

from tests.support.relais import asubmit, message, read_events, wait_for_events

FULL = "552 5.2.2 <full@alpha.test>: Mailbox full"


async def test_mailbox_full_5xx_is_retried_and_then_delivered(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"full@alpha.test": FULL}
    stack = await make_stack()
    assert (await asubmit(stack.smtp_address, recipients=["full@alpha.test"], data=message()))[0] == 250
    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred.reply["code"] == 552 and deferred.reply["enhanced"] == "5.2.2"
    sink.rcpt_replies = {}
    (got,) = await sink.async_wait_for(1)
    assert got.rcpt_tos == ["full@alpha.test"]
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert not [e for e in await read_events(stack.config.nats.url) if e.kind == "bounced"]


async def test_operator_rule_can_make_it_final_again(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    make_sink("127.0.0.9")  # the sender's MX receives the DSN
    sink.rcpt_replies = {"full@alpha.test": FULL}
    rules = '[[rewrite]]\nname = "full-is-final"\nmatch = "Mailbox full"\noutcome = "permanent"\n'
    stack = await make_stack(delivery={"shaping_file": shaping_file(rules)})
    assert (await asubmit(stack.smtp_address, recipients=["full@alpha.test"], data=message()))[0] == 250
    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == ["full@alpha.test"]
    assert not [e for e in await read_events(stack.config.nats.url) if e.kind == "deferred"]

"""Some recipients accepted, some refused for good, some for now: each gets its own outcome,
whether the MX takes commands one by one or pipelined (RFC 2920: MAIL, every RCPT and DATA in
one write)."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.relais import asubmit, message, read_events, wait_for_events


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
async def test_each_recipient_gets_its_outcome_and_accepted_ones_are_never_retried(
    make_stack, make_sink, pipelining: bool
) -> None:
    sink = make_sink("127.0.0.2", pipelining=pipelining)
    make_sink("127.0.0.9")  # the sender's MX, where the DSN for bad@ lands
    sink.rcpt_replies = {
        "bad@alpha.test": "550 5.1.1 <bad@alpha.test>: no such user",
        "later@alpha.test": "450 4.2.1 <later@alpha.test>: mailbox busy",
    }
    stack = await make_stack()
    rcpts = ["good@alpha.test", "bad@alpha.test", "later@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    (first,) = await sink.async_wait_for(1)
    assert first.rcpt_tos == ["good@alpha.test"]
    assert sink.mail_reads[0] == (["MAIL", "RCPT", "RCPT", "RCPT", "DATA"] if pipelining else ["MAIL"])
    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred.recipients == ["later@alpha.test"]
    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == ["bad@alpha.test"] and bounced.reply["enhanced"] == "5.1.1"

    del sink.rcpt_replies["later@alpha.test"]
    got = await sink.async_wait_for(2)
    assert got[1].rcpt_tos == ["later@alpha.test"], "the retry carries only the deferred recipient"
    await asyncio.sleep(2.5)
    delivered = [r for m in sink.messages for r in m.rcpt_tos]
    assert sorted(delivered) == ["good@alpha.test", "later@alpha.test"], "each delivered exactly once"
    events = await read_events(stack.config.nats.url)
    to_alpha = [r for e in events if e.kind == "delivered" for r in e.recipients if r.endswith("@alpha.test")]
    assert sorted(to_alpha) == sorted(delivered), "(the DSN to the sender is delivered too)"


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
async def test_a_421_at_rcpt_defers_the_accepted_and_the_untried_and_keeps_the_bounce(
    make_stack, make_sink, pipelining: bool
) -> None:
    sink = make_sink("127.0.0.2", pipelining=pipelining)
    make_sink("127.0.0.9")
    sink.rcpt_replies = {
        "bad@alpha.test": "550 5.1.1 <bad@alpha.test>: no such user",
        "c@alpha.test": "421 4.7.0 closing, too busy",
    }
    stack = await make_stack(retry={"base_delay": 60.0})
    rcpts = ["bad@alpha.test", "good@alpha.test", "c@alpha.test", "d@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == ["bad@alpha.test"]
    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert sorted(deferred.recipients) == ["c@alpha.test", "d@alpha.test", "good@alpha.test"]
    assert deferred.reply["code"] == 421
    assert sink.messages == []


async def test_a_552_at_rcpt_is_taken_as_452(make_stack, make_sink) -> None:
    # RFC 5321 4.5.3.1.10: "too many recipients" at RCPT is temporary, whatever its first digit.
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"many@alpha.test": "552 5.5.3 Too many recipients"}
    stack = await make_stack(retry={"base_delay": 60.0})
    rcpts = ["first@alpha.test", "many@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred.recipients == ["many@alpha.test"] and deferred.reply["code"] == 552
    (got,) = await sink.async_wait_for(1)
    assert got.rcpt_tos == ["first@alpha.test"]
    assert [e for e in await read_events(stack.config.nats.url) if e.kind == "bounced"] == []

"""Temporary failures are retried later (JetStream schedules); permanent ones become DSNs."""

from __future__ import annotations

import asyncio
import email

from flufl.bounce import all_failures

from tests.support.relais import RelaisStack, asubmit, message, read_events, wait_for_events


async def test_two_tempfails_then_success_delivers_exactly_once(stack: RelaisStack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 2
    assert (await asubmit(stack.smtp_address, recipients=["t@alpha.test"], data=message()))[0] == 250
    (got,) = await sink.async_wait_for(1, timeout=30)
    assert got.rcpt_tos == ["t@alpha.test"]
    assert sink.data_commands == 3
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 2)
    assert [e.attempt for e in deferred] == [1, 2]
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    await asyncio.sleep(2.5)  # longer than a retry interval: nothing else may arrive
    assert len(sink.messages) == 1
    assert not [e for e in await read_events(stack.config.nats.url) if e.kind == "bounced"]


async def test_permanent_failure_sends_a_dsn_a_standard_parser_reads(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": "550 5.1.1 <gone@alpha.test>: Recipient address rejected"}
    data = message(subject="Will bounce")
    code, _ = await asubmit(stack.smtp_address, recipients=["gone@alpha.test", "here@alpha.test"], data=data)
    assert code == 250

    (delivered,) = await sink.async_wait_for(1)
    assert delivered.rcpt_tos == ["here@alpha.test"], "the accepted recipient is delivered, once"
    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    temporary, permanent = all_failures(parsed)  # flufl.bounce returns (temporary, permanent)
    assert permanent == {b"gone@alpha.test"}
    assert not temporary
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "Subject: Will bounce" in dsn.data.decode(), "the DSN returns the original headers"
    await asyncio.sleep(1)
    assert len(sink.messages) == 1


async def test_failure_of_a_null_sender_message_sends_no_dsn(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    sink = make_sink("127.0.0.2")
    sink.data_reply = "554 5.7.1 Rejected"
    code, _ = await asubmit(
        stack.smtp_address, sender="", recipients=["r@alpha.test"], data=message(sender="news@acme.test")
    )
    assert code == 250
    await wait_for_events(stack.config.nats.url, "bounced", 1)
    await asyncio.sleep(1.5)
    assert sender_mx.messages == [], "no DSN may ever go to <>"


async def test_retries_stop_at_max_age_and_the_message_expires_with_a_dsn(
    make_stack, make_sink, sender_mx
) -> None:
    stack = await make_stack(retry={"base_delay": 1.0, "max_delay": 1.0, "max_age": 2.5})
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 100
    assert (await asubmit(stack.smtp_address, recipients=["slow@alpha.test"], data=message()))[0] == 250
    (dsn,) = await sender_mx.async_wait_for(1, timeout=30)
    _, permanent = all_failures(email.message_from_bytes(dsn.data))
    assert permanent == {b"slow@alpha.test"}
    assert b"4.4.7" in dsn.data
    (expired,) = await wait_for_events(stack.config.nats.url, "expired", 1)
    assert expired.recipients == ["slow@alpha.test"]
    assert sink.messages == []

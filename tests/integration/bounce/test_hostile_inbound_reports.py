"""Security, end to end over port 25: what strangers (or a bounce of our own report) send the
inbound listener is read in bounded time, and a returned feedback report is no complaint."""

from __future__ import annotations

import asyncio
import smtplib

from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import (
    RETURN_DOMAIN,
    bounce_over_smtp,
    stack_with_inbound_listener,
    suppression_entry,
    wait_consumed,
)
from tests.support.bounce_samples import arf_report, postfix_dsn
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, asubmit, message, read_events, wait_for_events


async def _send(inbound: tuple[str, int], rcpt: str, raw: bytes) -> None:
    def send() -> None:
        with smtplib.SMTP(*inbound, timeout=60) as client:
            client.ehlo("mx.stranger.test")
            client.sendmail("", [rcpt], raw)

    await asyncio.to_thread(send)


async def test_a_message_of_millions_of_empty_lines_is_acked_quickly(make_stack, make_sink) -> None:
    stack, inbound = await stack_with_inbound_listener(make_stack)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    assert (await asubmit(stack.smtp_address, recipients=["real@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)

    # 8 MB of empty lines: the bounce service spent over a minute of CPU on it.
    head = b"From: MAILER-DAEMON@mx.stranger.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
    flood = head + b"\r\n" + b"\r\n" * 4_000_000
    await _send(inbound, f"postmaster@{RETURN_DOMAIN}", flood)
    await bounce_over_smtp(inbound, sent.mail_from, "real@alpha.test")
    (bounced,) = await wait_for_events(url, "bounced", 1, timeout=20)
    assert bounced.recipients == ["real@alpha.test"]
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER, timeout=20)


async def test_a_bounced_feedback_report_we_sent_is_a_bounce_not_a_complaint(make_stack, make_sink) -> None:
    # acme forwards a complaint about reader@alpha.test to two addresses at alpha.test (one
    # token for the domain); one of them bounces, returning the report whole.
    stack, inbound = await stack_with_inbound_listener(make_stack)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    report = arf_report(
        to="abuse@alpha.test", recipient="reader@alpha.test", return_path=f"news@{SENDER_DOMAIN}"
    ).replace(b"From: <staff@fbl.gamma.test>", f"From: <news@{SENDER_DOMAIN}>".encode())
    rcpts = ["abuse@alpha.test", "postmaster@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=report))[0] == 250
    (sent,) = await sink.async_wait_for(1)

    dsn = postfix_dsn(to=sent.mail_from, recipient="abuse@alpha.test")
    head, _, _ = dsn.rpartition(b"--B0UND\r\nContent-Type: text/rfc822-headers")
    dsn = head + b"--B0UND\r\nContent-Type: message/rfc822\r\n\r\n" + sent.data + b"\r\n--B0UND--\r\n"
    await _send(inbound, sent.mail_from, dsn)

    (bounced,) = await wait_for_events(url, "bounced", 1, timeout=20)
    assert bounced.recipients == ["abuse@alpha.test"]
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)
    assert not [e for e in await read_events(url) if e.kind == "complained"]
    assert await suppression_entry(url, ACCOUNT, "reader@alpha.test") is None
    assert await suppression_entry(url, ACCOUNT, "abuse@alpha.test") is not None

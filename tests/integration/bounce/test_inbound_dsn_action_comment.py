"""A DSN whose Action carries a comment ("failed (Bad destination mailbox address)", as some MTAs
write it; DSN fields are structured fields, which may hold comments) is read as a DSN. It was
read as prose: its Status and Diagnostic-Code were thrown away, and a 5.1.1 whose prose said no
more than "delivery failed" came out "uncategorized", and was never suppressed."""

from __future__ import annotations

from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import (
    mail_over_smtp,
    stack_with_inbound_listener,
    suppression_entry,
    wait_consumed,
)
from tests.support.bounce_samples import postfix_dsn
from tests.support.relais import ACCOUNT, asubmit, message, wait_for_events


def commented_dsn(to: str, recipient: str) -> bytes:
    raw = postfix_dsn(to=to, recipient=recipient)
    prose = f"<{recipient}>: host mx2.alpha.test said: ".encode()
    assert prose in raw and b"Action: failed\r\n" in raw
    raw = raw.replace(b"Action: failed\r\n", b"Action: failed (Bad destination mailbox address)\r\n")
    # The prose names the recipient and nothing more; the reason is in the DSN's fields alone.
    head, _, tail = raw.partition(prose)
    return head + f"<{recipient}>: delivery failed\r\n".encode() + tail.partition(b"\r\n")[2]


async def test_a_dsn_with_a_comment_on_its_action_suppresses_by_its_status(make_stack, make_sink) -> None:
    stack, inbound = await stack_with_inbound_listener(make_stack)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    assert (await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)

    await mail_over_smtp(inbound, sent.mail_from, commented_dsn(sent.mail_from, "gone@alpha.test"))
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.recipients == ["gone@alpha.test"]
    assert bounced.detail["format"] == "dsn" and bounced.detail["category"] == "invalid_recipient"
    assert bounced.reply is not None and bounced.reply["enhanced"] == "5.1.1"
    assert bounced.detail.get("suppressed") == "true"
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)
    entry = await suppression_entry(url, ACCOUNT, "gone@alpha.test")
    assert entry is not None and entry.reason == "hard_bounce" and entry.category == "invalid_recipient"

"""Reports with a valid token whose outcome came out wrong: a recipient in raw UTF-8 suppressed
under a garbled name, and a report with a huge field that the consumer could never finish (its
input has no max_deliver, so it came back for ever and its outcome was never written)."""

from __future__ import annotations

import nats

from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.envelope import Envelope, new_message_id
from services.core.returnpath import verp_address
from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM, inbound_subject
from tests.integration.bounce.conftest import (
    RETURN_DOMAIN,
    SECRET,
    VERP,
    publish_inbound,
    suppression_entry,
    wait_consumed,
)
from tests.support.bounce_samples import postfix_dsn
from tests.support.relais import ACCOUNT, wait_for_events


def domain_return_path(message_id: str) -> str:
    """The return path of a job for several recipients at beta.test: its MAC binds the domain."""
    return verp_address(
        prefix="b",
        domain=RETURN_DOMAIN,
        secret=SECRET,
        account=ACCOUNT,
        message_id=message_id,
        recipients=["one@beta.test", "jürgen@beta.test"],
    )


async def test_a_raw_utf8_recipient_is_suppressed_as_written(make_stack) -> None:
    # An MTA without RFC 6533 writes an SMTPUTF8 recipient into message/delivery-status as raw
    # UTF-8. The parser handed its octets out as U+FFFD, which the domain-bound MAC accepted:
    # the event and the suppression named "j\ufffd\ufffdrgen@beta.test", nobody's address.
    stack = await make_stack(services=("bounce",), bounce=VERP)
    url = stack.config.nats.url
    message_id = new_message_id()
    to = domain_return_path(message_id)
    raw = postfix_dsn(to=to, recipient="jürgen@beta.test")
    assert "jürgen".encode() in raw
    await publish_inbound(url, raw, [to])

    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert (bounced.message_id, bounced.recipients) == (message_id, ["jürgen@beta.test"])
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)
    entry = await suppression_entry(url, ACCOUNT, "jürgen@beta.test")
    assert entry is not None and entry.source == message_id


async def publish_large_inbound(nats_url: str, raw: bytes, recipients: list[str]) -> None:
    """As the ingress does for a report over the inline limit: the body in the object store."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        env_id = new_message_id()
        body = await BodyStore(js, inline_max=64 * 1024).put(env_id, raw)
        env = Envelope(
            id=env_id,
            sender="",
            recipients=tuple(recipients),
            account="",
            sender_domain="",
            body=body,
            kind="inbound",
        )
        bus = Bus(nc=nc, js=js, publish_timeout=5.0)
        await bus.publish(inbound_subject(), env.to_msgpack(), msg_id=env.id)
    finally:
        await nc.close()


async def test_a_report_with_a_huge_field_is_reported_with_the_field_cut(make_stack) -> None:
    # Anyone who received a message knows its return path and may send a DSN whose
    # Diagnostic-Code (or Remote-MTA, or recipient) is megabytes long: the event carrying it
    # was more than NATS takes in one message (max_payload), so the publish failed every time.
    stack = await make_stack(services=("bounce",), bounce=VERP)
    url = stack.config.nats.url
    message_id = new_message_id()
    to = domain_return_path(message_id)
    huge = "550 5.1.1 <gone@beta.test>: User unknown " + "x" * (9 * 1024 * 1024)
    raw = postfix_dsn(to=to, recipient="gone@beta.test", diagnostic=huge)
    crowd = "x" * (9 * 1024 * 1024) + "@beta.test"  # no mailbox has such a name
    raw = raw.replace(
        b"\r\n\r\n--B0UND\r\nContent-Type: text/rfc822-headers",
        (
            f"\r\n\r\nFinal-Recipient: rfc822; {crowd}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            "\r\n--B0UND\r\nContent-Type: text/rfc822-headers"
        ).encode(),
        1,
    )
    await publish_large_inbound(url, raw, [to])

    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert (bounced.message_id, bounced.recipients) == (message_id, ["gone@beta.test"])
    assert bounced.reply is not None and bounced.reply["text"].startswith("550 5.1.1 <gone@beta.test>")
    assert len(bounced.reply["text"]) < 64 * 1024
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)
    assert await suppression_entry(url, ACCOUNT, "gone@beta.test") is not None
    assert await suppression_entry(url, ACCOUNT, crowd) is None

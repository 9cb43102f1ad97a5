"""A delivery job whose large body went by the Object Store's TTL still gets its one outcome.

A body lives `body_ttl` (retry.max_age + 2 days). A job that waited longer (a pool without
workers for that long) found it gone and was dropped as a redelivery of a finished job: no
outcome, no DSN, the sender never heard of it. Received that long ago it cannot be such a
redelivery, so it expires (4.4.7) with a DSN. A younger job without its body still is one, and
is still dropped without a word."""

from __future__ import annotations

import email
import time
from dataclasses import replace
from email.message import Message

import pytest
from nats.js.errors import NotFoundError

from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.envelope import BodyRef, Envelope, new_message_id
from services.core.outcome import EXPIRED
from services.core.topology import (
    BODY_REFS_BUCKET,
    BOUNCE_STREAM,
    DELIVER_STREAM,
    ROUTE_STREAM,
    body_ttl,
    deliver_subject,
    delivery_consumer,
)
from tests.integration.bounce.conftest import wait_consumed, wait_settled
from tests.integration.delivery.conftest import SENDER_MX
from tests.support.relais import an_envelope, read_events, wait_for_events
from tests.support.smtp_sink import SMTPSink

LARGE = 200_000  # over nats.inline_body_max: the body would be in the Object Store


def bodiless(recipients: tuple[str, ...], received_at: float, **fields: object) -> Envelope:
    """A message whose large body is not (or no longer) in the Object Store: never written."""
    mid = new_message_id()
    return an_envelope(
        *recipients, id=mid, body=BodyRef(size=LARGE, object_name=mid), received_at=received_at, **fields
    )


def delivery_status(dsn: bytes) -> dict[str, Message]:
    """The per-recipient blocks of a DSN's message/delivery-status part, by Final-Recipient."""
    parts = list(email.message_from_bytes(dsn).walk())
    (status,) = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    return {str(b["Final-Recipient"]): b for b in status.get_payload()[1:]}


def assert_expiry_dsn(dsn: bytes, recipients: tuple[str, ...]) -> None:
    """A failure DSN saying each recipient expired: no headers of a body that is gone."""
    blocks = delivery_status(dsn)
    assert set(blocks) == {f"rfc822; {r}" for r in recipients}
    for block in blocks.values():
        assert block["Action"] == "failed"
        assert block["Status"] == EXPIRED.enhanced_status
        diagnostic = " ".join(str(block["Diagnostic-Code"]).split())
        assert diagnostic.startswith(f"x-relais; {EXPIRED.code} {EXPIRED.enhanced_status} {EXPIRED.text}")
    report = email.message_from_bytes(dsn)
    kinds = [p.get_content_type() for p in report.get_payload()]
    assert kinds == ["text/plain", "message/delivery-status"], "no headers made up for a body that is gone"
    text = " ".join(report.get_payload()[0].get_payload(decode=True).decode().split())
    assert "It is no longer held here, so none of it is attached." in text


async def assert_expired_with_one_dsn(
    url: str, sender_mx: SMTPSink, env: Envelope, recipients: tuple[str, ...]
) -> None:
    """Each recipient expired (4.4.7) and nothing else, one DSN to the sender saying so."""
    expired = await wait_for_events(url, "expired", len(recipients))
    assert sorted(r for e in expired for r in e.recipients) == sorted(recipients)
    assert all(e.message_id == env.id and e.reply and e.reply["enhanced"] == "4.4.7" for e in expired)
    (dsn,) = await sender_mx.async_wait_for(1)
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == [env.sender]
    assert_expiry_dsn(dsn.data, recipients)
    # Its outcome is in: every event the message will have is out.
    kinds = [e.kind for e in await read_events(url) if e.message_id == env.id]
    assert kinds == ["expired"] * len(recipients)


def job(env: Envelope) -> Envelope:
    """The delivery job the router made of a one-domain message."""
    site = "alpha.test"
    return replace(
        env, job_id=f"{env.id}-0", pool="default", domain=site, site=site, mx_hosts=(f"mx.{site}",)
    )


async def publish_job(bus: Bus, env: Envelope) -> None:
    await bus.publish(deliver_subject("default"), env.to_msgpack(), msg_id=env.job_id)


async def test_a_job_older_than_its_body_ttl_expires_with_a_dsn(make_stack, make_sink) -> None:
    mx = make_sink("127.0.0.2")
    sender_mx = make_sink(SENDER_MX)
    stack = await make_stack(services=("router", "delivery", "bounce"))
    url = stack.config.nats.url
    recipients = ("late@alpha.test", "later@alpha.test")
    env = job(bodiless(recipients, time.time() - body_ttl(stack.config) - 60.0))
    bus = stack._buses[0]
    # The router's record of the job holding the body, written after the body: it outlives it.
    await BodyStore(bus.js, stack.config.nats.inline_body_max).hold(env.body, [env.job_id])

    await publish_job(bus, env)

    await assert_expired_with_one_dsn(url, sender_mx, env, recipients)
    assert mx.messages == []
    # The body's release after the DSN finds no body to delete, and is no error for that. The
    # window's flush releases it before it finishes the window, which wait_settled waits for.
    await wait_settled(url)
    with pytest.raises(NotFoundError):
        await (await bus.js.key_value(BODY_REFS_BUCKET)).get(env.body.object_name)


async def test_a_younger_job_without_its_body_is_still_dropped_silently(make_stack, make_sink) -> None:
    # A redelivery of a job whose outcome is stored, its body released: a second outcome would
    # be a second DSN for one message.
    mx = make_sink("127.0.0.2")
    stack = await make_stack(services=("delivery", "bounce"))
    url = stack.config.nats.url
    env = job(bodiless(("again@alpha.test",), time.time() - stack.config.retry.max_age))

    await publish_job(stack._buses[0], env)
    await wait_consumed(url, DELIVER_STREAM, delivery_consumer("default"))

    for stream in (BOUNCE_STREAM, ROUTE_STREAM):  # no bounce notice (so no DSN), no retry
        info = await stack._buses[0].js.stream_info(stream)
        assert info.state.last_seq == 0, f"nothing was ever stored on {stream}"
    assert [e for e in await read_events(url) if e.message_id == env.id] == []
    assert mx.messages == []

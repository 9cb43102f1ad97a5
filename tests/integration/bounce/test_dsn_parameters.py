"""RFC 3461 at the bounce service: NOTIFY=NEVER silences a recipient, ORCPT becomes
Original-Recipient, RET=FULL returns the whole message, ENVID comes back.

The envelopes are published to the router's subject exactly as the ingress does, with the
per-recipient parameters the ingress records at RCPT."""

from __future__ import annotations

import asyncio
import email

from flufl.bounce import all_failures

from services.core.envelope import Envelope
from tests.integration.bounce.conftest import publish_submission, wait_settled
from tests.support.relais import (
    SENDER_DOMAIN,
    RelaisStack,
    an_envelope,
    asubmit,
    message,
    stored_bodies,
    wait_for_events,
)

SENDER = f"news@{SENDER_DOMAIN}"
REJECT = "550 5.1.1 No such user"


def envelope(recipients: tuple[str, ...], data: bytes, **dsn: object) -> Envelope:
    return an_envelope(*recipients, body=data, **dsn)


async def test_notify_orcpt_ret_and_envid_shape_the_dsn(stack: RelaisStack, make_sink, sender_mx) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = REJECT
    data = message(subject="Parameters", body="The body travels back with RET=FULL.\r\n")
    env = envelope(
        ("quiet@alpha.test", "orig@alpha.test", "plain@alpha.test"),
        data,
        dsn_notify={"quiet@alpha.test": "NEVER", "orig@alpha.test": "FAILURE,DELAY"},
        dsn_orcpt={"orig@alpha.test": "rfc822;Original.Name@alpha.test"},
        dsn_ret="FULL",
        dsn_envid="campaign-42",
    )
    await publish_submission(stack.config.nats.url, env)

    bounced = await wait_for_events(stack.config.nats.url, "bounced", 3)
    assert {r for e in bounced for r in e.recipients} == set(env.recipients), "events ignore NOTIFY"
    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    _, permanent = all_failures(parsed)
    assert b"quiet@alpha.test" not in permanent
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert blocks[0]["Original-Envelope-Id"] == "campaign-42"
    finals = {b["Final-Recipient"]: b for b in blocks[1:]}
    assert set(finals) == {"rfc822; orig@alpha.test", "rfc822; plain@alpha.test"}
    assert finals["rfc822; orig@alpha.test"]["Original-Recipient"] == "rfc822; Original.Name@alpha.test"
    assert finals["rfc822; plain@alpha.test"]["Original-Recipient"] is None
    returned = next(p for p in parsed.walk() if p.get_content_type() == "message/rfc822")
    assert b"The body travels back with RET=FULL." in returned.as_bytes()


async def test_notify_never_for_every_recipient_sends_no_dsn(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = REJECT
    env = envelope(("a@alpha.test",), message(), dsn_notify={"a@alpha.test": "NEVER"})
    await publish_submission(stack.config.nats.url, env)
    await wait_for_events(stack.config.nats.url, "bounced", 1)
    await wait_settled(stack.config.nats.url)
    assert sender_mx.messages == []


async def test_an_orcpt_or_envid_with_a_line_break_is_left_out_of_a_dsn_that_still_goes(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    # Queued before the ingress refused such values: the DSN must not be refused forever.
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = REJECT
    injected = "rfc822;orig@alpha.test\r\nBcc: victim@beta.test"
    env = envelope(
        ("orig@alpha.test",), message(), dsn_orcpt={"orig@alpha.test": injected}, dsn_envid="id\r\nX-Evil: 1"
    )
    await publish_submission(stack.config.nats.url, env)

    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert blocks[0]["Original-Envelope-Id"] is None
    assert blocks[1]["Final-Recipient"] == "rfc822; orig@alpha.test"
    assert blocks[1]["Original-Recipient"] is None
    assert b"victim@beta.test" not in dsn.data and b"X-Evil" not in dsn.data


def _blocks(dsn: bytes) -> tuple[email.message.Message, dict[str, email.message.Message]]:
    parsed = email.message_from_bytes(dsn)
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    return blocks[0], {b["Final-Recipient"]: b for b in blocks[1:]}


async def test_notify_success_gets_a_relayed_dsn_once_delivered(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    # Relais advertises DSN but passes no DSN request on to the MX, so it must report the relay
    # itself (RFC 3461 section 5.2.2); without it, NOTIFY=SUCCESS was silently dropped.
    sink = make_sink("127.0.0.2")
    env = envelope(
        ("ok@alpha.test", "plain@alpha.test"),
        message(subject="Receipt wanted", body="Body stays home.\r\n"),
        dsn_notify={"ok@alpha.test": "SUCCESS"},
        dsn_envid="campaign-7",
        dsn_ret="FULL",
    )
    await publish_submission(stack.config.nats.url, env)

    (delivered,) = await sink.async_wait_for(1)
    assert set(delivered.rcpt_tos) == {"ok@alpha.test", "plain@alpha.test"}
    (dsn,) = await sender_mx.async_wait_for(1)
    per_message, finals = _blocks(dsn.data)
    assert per_message["Original-Envelope-Id"] == "campaign-7"
    assert set(finals) == {"rfc822; ok@alpha.test"}, "plain@ asked for nothing (FAILURE,DELAY)"
    relayed = finals["rfc822; ok@alpha.test"]
    assert relayed["Action"] == "relayed" and relayed["Status"].startswith("2.")
    parsed = email.message_from_bytes(dsn.data)
    # A DSN reporting no failure returns the headers only, whatever RET asked (RFC 3461 4.3).
    assert not [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
    assert b"Body stays home." not in dsn.data and b"Receipt wanted" in dsn.data
    await wait_settled(stack.config.nats.url)
    assert len(sender_mx.messages) == 1


async def test_a_failure_and_a_relay_of_one_attempt_share_one_dsn(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies["gone@alpha.test"] = REJECT
    env = envelope(
        ("ok@alpha.test", "gone@alpha.test"),
        message(),
        dsn_notify={"ok@alpha.test": "SUCCESS,FAILURE", "gone@alpha.test": "SUCCESS,FAILURE"},
    )
    await publish_submission(stack.config.nats.url, env)

    await wait_for_events(stack.config.nats.url, "bounced", 1)
    (dsn,) = await sender_mx.async_wait_for(1)
    _, finals = _blocks(dsn.data)
    assert finals["rfc822; ok@alpha.test"]["Action"] == "relayed"
    assert finals["rfc822; gone@alpha.test"]["Action"] == "failed"
    await wait_settled(stack.config.nats.url)
    assert len(sender_mx.messages) == 1


async def _submit_with_notify(address: tuple[str, int], notify: dict[str, str], data: bytes) -> int:
    """Submit over SMTP with each recipient's NOTIFY ("" for none)."""
    code, _ = await asubmit(
        address,
        recipients=list(notify),
        data=data,
        mail_options=["RET=HDRS", "ENVID=big-1"],
        rcpt_options={rcpt: [f"NOTIFY={words}"] for rcpt, words in notify.items() if words},
    )
    return code


def _large(subject: str) -> bytes:
    """Over inline_body_max: stored in the Object Store, released by reference count."""
    return message(subject=subject, body=("y" * 76 + "\r\n") * 3_000)


async def test_a_large_body_stays_until_its_relayed_dsn_has_its_headers(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    # Over inline_body_max: the body is in the Object Store, and the notice, not the delivery,
    # releases it, once the DSN has copied its headers.
    sink = make_sink("127.0.0.2")
    notify = {"big@alpha.test": "SUCCESS"}
    code = await _submit_with_notify(stack.smtp_address, notify, _large("Large receipt"))
    assert code == 250

    await sink.async_wait_for(1)
    (dsn,) = await sender_mx.async_wait_for(1)
    per_message, finals = _blocks(dsn.data)
    assert per_message["Original-Envelope-Id"] == "big-1"
    assert finals["rfc822; big@alpha.test"]["Action"] == "relayed"
    assert b"Subject: Large receipt" in dsn.data
    await _until_no_bodies(stack.config.nats.url)


async def _until_no_bodies(nats_url: str) -> None:
    for _ in range(100):
        if await stored_bodies(nats_url) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the body was never released")


async def test_a_retry_ending_first_leaves_the_body_to_its_attempts_dsn(
    make_stack, make_sink, sender_mx
) -> None:
    # ok@ is relayed and later@ deferred in one attempt; the DSN waits for its window, and the
    # retry delivers later@ before that. The job's last outcome released the body, and the DSN
    # went out with an empty headers part.
    stack = await make_stack(bounce={"dsn_window": 6.0})
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies["later@alpha.test"] = "451 4.2.0 Try again later"
    notify = {"ok@alpha.test": "SUCCESS", "later@alpha.test": ""}
    code = await _submit_with_notify(stack.smtp_address, notify, _large("Held receipt"))
    assert code == 250

    await wait_for_events(stack.config.nats.url, "deferred", 1)
    del sink.rcpt_replies["later@alpha.test"]
    await wait_for_events(stack.config.nats.url, "delivered", 2)
    assert not sender_mx.messages, "the DSN window is still open"
    (dsn,) = await sender_mx.async_wait_for(1)
    _, finals = _blocks(dsn.data)
    assert set(finals) == {"rfc822; ok@alpha.test"}
    assert b"Subject: Held receipt" in dsn.data
    await _until_no_bodies(stack.config.nats.url)

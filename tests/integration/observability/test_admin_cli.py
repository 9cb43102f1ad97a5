"""The admin CLI against a running cluster, over NATS only: message history, status, pause,
requeue and bounce-queue. Each command runs as a real `relais` process."""

from __future__ import annotations

import asyncio
import email

from flufl.bounce import all_failures

from services.core.topology import DELIVER_STREAM
from tests.support.relais import (
    RelaisStack,
    asubmit,
    message,
    read_events,
    relais_cli,
    wait_for_events,
    wait_for_stored,
)

HOUR = 3600.0


def queued_id(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[-1]


async def test_message_shows_acceptance_each_attempt_with_its_reply_and_the_outcome(
    stack: RelaisStack, make_sink, spans
) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 2
    code, reply = await asubmit(stack.smtp_address, recipients=["t@alpha.test"], data=message())
    assert code == 250
    mid = queued_id(reply)
    (delivered,) = await wait_for_events(stack.config.nats.url, "delivered", 1, timeout=30)
    rc, out = await relais_cli("message", mid, nats_url=stack.config.nats.url)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"message {mid}  account acme  from <news@acme.test>")
    assert delivered.trace_id and f"trace {delivered.trace_id}" in lines[1]
    steps = [line.split()[2] for line in lines[2:-1]]
    assert steps == ["accepted", "deferred", "deferred", "delivered"], out
    deferred = [line for line in lines if " deferred " in line]
    assert all("451" in line and "next try" in line for line in deferred), out
    assert "attempt 1" in deferred[0] and "attempt 2" in deferred[1]
    (delivered_line,) = [line for line in lines if " delivered " in line]
    assert "attempt 3" in delivered_line, out
    assert lines[-1] == "final: delivered"

    rc, out = await relais_cli("message", "0190000000000000000000", nats_url=stack.config.nats.url)
    assert rc == 1 and "no events" in out


async def test_message_is_not_final_while_a_recipient_is_still_queued(make_stack, make_sink) -> None:
    # Retries an hour apart: beta.test's recipient stays deferred while alpha.test's is delivered.
    stack = await make_stack(retry={"base_delay": HOUR, "max_delay": HOUR, "max_age": 24 * HOUR})
    make_sink("127.0.0.2")
    make_sink("127.0.0.3").tempfail_data = 1
    recipients = ["a@alpha.test", "b@beta.test"]
    code, reply = await asubmit(stack.smtp_address, recipients=recipients, data=message())
    assert code == 250
    mid = queued_id(reply)
    url = stack.config.nats.url
    await wait_for_events(url, "delivered", 1)
    await wait_for_events(url, "deferred", 1)
    rc, out = await relais_cli("message", mid, nats_url=url)
    assert rc == 0, out
    assert "final:" not in out, out
    assert out.splitlines()[-1] == "still queued: b@beta.test", out


async def test_pause_and_resume_show_in_status(stack: RelaisStack) -> None:
    url = stack.config.nats.url
    # A site as the router names it: alpha.test's, the registrable part of its MX host mx.alpha.test.
    rc, out = await relais_cli("pause", "site", "alpha.test", "--reason", "incident 42", nats_url=url)
    assert rc == 0 and "paused site alpha.test" in out, out
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert rc == 0, out
    assert "RELAIS_DELIVER" in out and "delivery-default (pool default)" in out
    # The router's queues: new mail, and mail routed again.
    tables = out.split("\n\n")[:2]
    streams, consumers = ({line.split()[0] for line in table.splitlines()[1:]} for table in tables)
    assert {"RELAIS_SUBMIT", "RELAIS_ROUTE"} <= streams, out
    assert {"router-submit", "router"} <= consumers, out
    paused = out.split("PAUSED", 1)[1]
    assert "site    alpha.test  (incident 42)" in paused, out
    rc, out = await relais_cli("resume", "site", "alpha.test", nats_url=url)
    assert rc == 0 and "resumed" in out
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert "PAUSED: nothing" in out, out
    rc, out = await relais_cli("pause", "planet", "mars", nats_url=url)
    assert rc != 0


async def test_status_shows_the_mail_queued_for_delivery_by_site(make_stack) -> None:
    # No delivery service: routed jobs wait in the delivery stream, as behind a slow site.
    stack = await make_stack(services=("ingress", "router"))
    url = stack.config.nats.url
    for recipients in (["a@alpha.test", "b@alpha.test"], ["c@beta.test"], ["d@alpha.test"]):
        code, _ = await asubmit(stack.smtp_address, recipients=recipients, data=message())
        assert code == 250
    await wait_for_stored(url, DELIVER_STREAM, 3)
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert rc == 0, out
    queued = out.split("QUEUED RECIPIENTS BY SITE", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split() for line in queued] == [["alpha.test", "3"], ["beta.test", "1"]], out
    assert "DEFERRED: none" in out, out


async def test_requeue_retries_deferred_mail_for_a_site_now(make_stack, make_sink) -> None:
    stack = await make_stack(retry={"base_delay": HOUR, "max_delay": HOUR, "max_age": 5 * 24 * HOUR})
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    code, reply = await asubmit(stack.smtp_address, recipients=["later@alpha.test"], data=message())
    assert code == 250
    await wait_for_events(url, "deferred", 1)
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert "DEFERRED RECIPIENTS BY SITE" in out and "alpha.test" in out.split("DEFERRED", 1)[1], out

    rc, out = await relais_cli("requeue", "beta.test", nats_url=url)
    assert rc == 0 and "0 deferred job(s)" in out, out
    rc, out = await relais_cli("requeue", "alpha.test", nats_url=url)
    assert rc == 0 and "1 deferred job(s) for alpha.test requeued" in out, out
    (got,) = await sink.async_wait_for(1, timeout=20)  # an hour early
    assert got.rcpt_tos == ["later@alpha.test"]
    (delivered,) = await wait_for_events(url, "delivered", 1)
    assert delivered.message_id == queued_id(reply)
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert "DEFERRED: none" in out, out


async def test_bounce_queue_bounces_deferred_mail_with_the_admin_reason(
    make_stack, make_sink, sender_mx
) -> None:
    stack = await make_stack(retry={"base_delay": HOUR, "max_delay": HOUR, "max_age": 5 * 24 * HOUR})
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 5
    code, reply = await asubmit(stack.smtp_address, recipients=["stuck@alpha.test"], data=message())
    assert code == 250
    await wait_for_events(url, "deferred", 1)
    rc, out = await relais_cli("bounce-queue", "alpha.test", "--reason", "customer asked", nats_url=url)
    assert rc == 0 and "1 deferred job(s) for alpha.test bounced" in out, out

    (dsn,) = await sender_mx.async_wait_for(1, timeout=20)
    _, permanent = all_failures(email.message_from_bytes(dsn.data))
    assert permanent == {b"stuck@alpha.test"}
    assert b"5.0.0" in dsn.data and b"customer asked" in dsn.data
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.message_id == queued_id(reply)
    assert bounced.reply and bounced.reply["enhanced"] == "5.0.0"
    await asyncio.sleep(1)
    assert sink.messages == []
    assert not [
        e for e in await read_events(url) if e.kind == "delivered" and e.message_id == bounced.message_id
    ]

    (dsn_delivered,) = await wait_for_events(url, "delivered", 1)  # the DSN, to the sender's MX
    rc, out = await relais_cli("message", bounced.message_id, nats_url=url)
    assert rc == 0, out
    assert "bounced" in out and "5.0.0 Bounced by the administrator: customer asked" in out
    assert f"DSN {dsn_delivered.message_id} to news@acme.test" in out
    assert out.splitlines()[-1] == "final: bounced"

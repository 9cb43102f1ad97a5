"""Outcome counters count each recipient's outcome once, and only what they say they count."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.config import RetryConfig
from services.core.disposition import settle
from services.core.envelope import Envelope
from services.core.events import event_for, publish_event
from services.core.outcome import Deferred, Reply
from tests.support.prom import scrape, value
from tests.support.relais import SENDER_DOMAIN, an_envelope, asubmit, message, wait_for_events

USER_UNKNOWN = Reply(550, "5.1.1", "User unknown", "RCPT")


def envelope(pool: str) -> Envelope:
    return an_envelope(
        "gone@x.test",
        body=b"x",
        id="m-dup",
        job_id="m-dup-x",
        sender=f"s@{SENDER_DOMAIN}",
        pool=pool,
        site="x.test",
    )


async def test_an_outcome_published_again_is_counted_once(topology_bus: Bus) -> None:
    # A redelivered bounce notice publishes the same event (same msg id) a second time. (After
    # a timed-out publish of this process, see test_outcome_after_lost_ack.)
    pool = "dup-pool"  # a pool of this test only: the registry is shared by the whole process
    event = event_for("bounced", envelope(pool), ["gone@x.test"], USER_UNKNOWN, detail={"category": "bad"})
    before = scrape()
    await publish_event(topology_bus, event, msg_id="bounced-m-dup-1-gone@x.test")
    await publish_event(topology_bus, event, msg_id="bounced-m-dup-1-gone@x.test")
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relais_recipients_total", outcome="bounced", pool=pool) == 1
    assert delta("relais_bounces_total", pool=pool) == 1


async def test_a_deferral_without_an_smtp_session_is_not_counted_as_plaintext(make_stack, zone) -> None:
    zone.add("flaky.test", "MX", "10 mx.flaky.test.")
    zone.set_servfail("flaky.test")
    stack = await make_stack()
    before = scrape()
    code, _ = await asubmit(stack.smtp_address, recipients=["f@flaky.test"], data=message())
    assert code == 250
    await wait_for_events(stack.config.nats.url, "deferred", 1)
    deadline = time.monotonic() + 10
    while True:  # the event is stored a moment before it is counted
        after = scrape()
        deferred = value(after, "relais_recipients_total", outcome="deferred") - value(
            before, "relais_recipients_total", outcome="deferred"
        )
        if deferred >= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert deferred >= 1
    plaintext = value(after, "relais_tls_recipients_total", direction="outbound") - value(
        before, "relais_tls_recipients_total", direction="outbound"
    )
    assert plaintext == 0, "no SMTP session took place: neither TLS nor plaintext"


async def test_a_redelivered_deferral_is_counted_once(topology_bus: Bus) -> None:
    # The same attempt settled twice (its job redelivered after the first settle): the
    # deferred event goes out in the background, and its duplicate must not count again.
    pool = "dup-deferred-pool"
    env = dataclasses.replace(envelope(pool), received_at=time.time())
    outcomes = [Deferred("gone@x.test", Reply(451, "4.3.0", "Try later", "RCPT"))]
    bodies = BodyStore(topology_bus.js, 128 * 1024)
    before = scrape()
    for _ in range(2):
        await settle(topology_bus, bodies, RetryConfig(), env, outcomes)
    await topology_bus.flush()
    after = scrape()
    deferred = value(after, "relais_recipients_total", outcome="deferred", pool=pool) - value(
        before, "relais_recipients_total", outcome="deferred", pool=pool
    )
    assert deferred == 1

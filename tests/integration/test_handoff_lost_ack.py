"""The hand-off against a real JetStream when an ack goes missing (as in a stream leader change):
stored but unacknowledged -> asked again with the same message id -> `250`, one copy queued,
even when the election outlasts `nats.publish_timeout`; never stored -> `451 4.3.0` within
`publish_timeout` when every failure was certain, within `ingress.queue_timeout` when one may
have stored it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import EVENTS_STREAM, SUBMIT_STREAM, ensure_topology
from services.ingress.handoff import Handoff, Submission

SUBMISSION = Submission(
    account="acme",
    sender="news@acme.test",
    recipients=("r@alpha.test",),
    sender_domain="acme.test",
    data=b"Subject: hi\r\n\r\nhello\r\n",
)


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(NatsConfig(url=nats_server.url), "test-handoff")
    await ensure_topology(bus.js, Config())
    try:
        yield bus
    finally:
        await bus.close()


def fail_publishes(
    bus: Bus,
    monkeypatch: pytest.MonkeyPatch,
    *,
    store_first: bool,
    failures: int = 1_000_000,
    for_seconds: float = float("inf"),
    maybe_stored: bool = True,
) -> list[str]:
    """The first `failures` publishes, or those in the first `for_seconds`, raise as a lost ack
    does (`maybe_stored`) or as a certain failure does; with `store_first` they reach JetStream
    before raising (stored, ack lost), otherwise they never leave."""
    real = bus.publish
    calls: list[str] = []
    until = time.monotonic() + for_seconds

    async def publish(subject: str, payload: bytes, **kwargs: Any) -> None:
        calls.append(subject)
        if len(calls) <= failures and time.monotonic() < until:
            if store_first:
                await real(subject, payload, **kwargs)
            raise BrokerUnavailable(
                "ack lost" if maybe_stored else "no responders", maybe_stored=maybe_stored
            )
        await real(subject, payload, **kwargs)

    monkeypatch.setattr(bus, "publish", publish)
    return calls


async def submitted_messages(bus: Bus) -> int:
    return (await bus.js.stream_info(SUBMIT_STREAM)).state.messages


async def test_a_stored_message_whose_ack_was_lost_is_accepted_once(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), publish_timeout=3.0)
    calls = fail_publishes(bus, monkeypatch, store_first=True, failures=1)
    reply = await handoff.queue(SUBMISSION, message_id="lost-ack-1")
    assert reply.startswith("250 "), reply
    assert len(calls) >= 2, "published again after the lost ack"
    assert await submitted_messages(bus) == 1, "the second publish was de-duplicated by JetStream"
    await bus.flush(5.0)
    accepted = await bus.js.get_last_msg(EVENTS_STREAM, "relais.events.acme.accepted")
    assert accepted.headers and accepted.headers.get("Nats-Msg-Id") == "acc-lost-ack-1"


async def test_nothing_acknowledged_within_the_deadline_is_a_451(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), publish_timeout=1.0, queue_timeout=2.5)
    calls = fail_publishes(bus, monkeypatch, store_first=False)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="services.ingress.handoff"):
        reply = await handoff.queue(SUBMISSION, message_id="never-acked-1")
    took = time.monotonic() - started
    assert reply.startswith("451 4.3.0"), reply
    assert 1.5 < took < 4.5, f"451 after about queue_timeout, not publish_timeout: {took:.1f}s"
    assert len(calls) >= 3, "retried while the deadline allowed"
    assert await submitted_messages(bus) == 0
    assert any(r.levelno == logging.ERROR and "may be queued" in r.getMessage() for r in caplog.records), (
        "a 451 that may still be delivered is an error for the operator"
    )


async def test_an_election_longer_than_the_publish_timeout_still_gets_its_250(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored, then no ack for longer than `nats.publish_timeout` (an election on a loaded
    cluster): a 451 would have the client send again a message that is delivered anyway."""
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), publish_timeout=0.6, queue_timeout=10.0)
    calls = fail_publishes(bus, monkeypatch, store_first=True, for_seconds=2.0)
    reply = await handoff.queue(SUBMISSION, message_id="long-election-1")
    assert reply.startswith("250 "), reply
    assert len(calls) >= 3, "asked again past the publish timeout"
    assert await submitted_messages(bus) == 1, "every copy after the first was de-duplicated"


async def test_certain_failures_are_a_451_after_the_publish_timeout(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing can have been stored (no responders, say): no reason to hold the client longer."""
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), publish_timeout=1.0, queue_timeout=10.0)
    calls = fail_publishes(bus, monkeypatch, store_first=False, maybe_stored=False)
    started = time.monotonic()
    reply = await handoff.queue(SUBMISSION, message_id="no-responders-1")
    took = time.monotonic() - started
    assert reply.startswith("451 4.3.0"), reply
    assert took < 3.0, f"451 after about publish_timeout: {took:.1f}s"
    assert len(calls) >= 2
    assert await submitted_messages(bus) == 0


async def test_a_stopping_ingress_stops_asking_by_its_stop_bound(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), publish_timeout=0.6, queue_timeout=30.0)
    fail_publishes(bus, monkeypatch, store_first=False)
    started = time.monotonic()
    handoff.stop_by(asyncio.get_running_loop().time() + 2.0)
    reply = await handoff.queue(SUBMISSION, message_id="stopping-1")
    took = time.monotonic() - started
    assert reply.startswith("451 4.3.0"), reply
    assert took < 4.0, f"451 by the stop's bound, not queue_timeout: {took:.1f}s"

"""The hand-off against a real JetStream when an ack goes missing (as in a stream leader change):
stored but unacknowledged -> asked again with the same message id -> `250`, one copy queued;
never stored -> `451 4.3.0` within the deadline."""

from __future__ import annotations

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
    bus: Bus, monkeypatch: pytest.MonkeyPatch, *, store_first: bool, failures: int
) -> list[str]:
    """The first `failures` publishes raise as a lost ack does; with `store_first` they reach
    JetStream before raising (stored, ack lost), otherwise they never leave."""
    real = bus.publish
    calls: list[str] = []

    async def publish(subject: str, payload: bytes, **kwargs: Any) -> None:
        calls.append(subject)
        if len(calls) <= failures:
            if store_first:
                await real(subject, payload, **kwargs)
            raise BrokerUnavailable("ack lost", maybe_stored=True)
        await real(subject, payload, **kwargs)

    monkeypatch.setattr(bus, "publish", publish)
    return calls


async def submitted_messages(bus: Bus) -> int:
    return (await bus.js.stream_info(SUBMIT_STREAM)).state.messages


async def test_a_stored_message_whose_ack_was_lost_is_accepted_once(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), deadline=3.0)
    calls = fail_publishes(bus, monkeypatch, store_first=True, failures=1)
    reply = await handoff.queue(SUBMISSION, message_id="lost-ack-1")
    assert reply.startswith("250 "), reply
    assert len(calls) >= 2, "published again after the lost ack"
    assert await submitted_messages(bus) == 1, "the second publish was de-duplicated by JetStream"
    await bus.flush(5.0)
    accepted = await bus.js.get_last_msg(EVENTS_STREAM, "relais.events.acme.accepted")
    assert accepted.headers and accepted.headers.get("Nats-Msg-Id") == "acc-lost-ack-1"


async def test_nothing_acknowledged_within_the_deadline_is_a_451(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff = Handoff(bus, BodyStore(bus.js, 64 * 1024, bus), deadline=1.0)
    calls = fail_publishes(bus, monkeypatch, store_first=False, failures=1_000)
    started = time.monotonic()
    reply = await handoff.queue(SUBMISSION, message_id="never-acked-1")
    assert reply.startswith("451 4.3.0"), reply
    assert time.monotonic() - started < 3.0, "451 within about the deadline"
    assert len(calls) >= 2, "retried while the deadline allowed"
    assert await submitted_messages(bus) == 0

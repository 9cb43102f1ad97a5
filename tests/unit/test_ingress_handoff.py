"""The accepted event after the 250: bounded in flight, retried, drained at stop; its JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict

from services.core.bus import BrokerUnavailable
from services.core.events import Event
from services.core.outcome import Reply
from services.ingress.handoff import EventFeed


class FakeBus:
    """Publishes block until `release` is set; the first `fail` publishes are refused."""

    def __init__(self, fail: int = 0) -> None:
        self.release = asyncio.Event()
        self.published: list[tuple[str, bytes, str | None]] = []
        self.fail = fail

    async def publish(self, subject: str, payload: bytes, *, msg_id: str | None = None, **_: object) -> None:
        await self.release.wait()
        if self.fail:
            self.fail -= 1
            raise BrokerUnavailable("not now")
        self.published.append((subject, payload, msg_id))


def event(n: int) -> Event:
    return Event(kind="accepted", message_id=f"m{n}", account="acme", recipients=["r@alpha.test"])


async def test_send_returns_before_the_ack_and_drain_waits_for_it() -> None:
    bus = FakeBus()
    feed = EventFeed(bus)  # type: ignore[arg-type]
    await feed.send(event(1), msg_id="acc-m1")
    assert feed.in_flight == 1 and bus.published == []
    bus.release.set()
    await feed.drain(5.0)
    assert feed.in_flight == 0
    ((subject, payload, msg_id),) = bus.published
    assert subject == "relais.events.acme.accepted" and msg_id == "acc-m1"
    assert json.loads(payload)["message_id"] == "m1"


async def test_in_flight_is_bounded() -> None:
    bus = FakeBus()
    feed = EventFeed(bus, max_in_flight=2)  # type: ignore[arg-type]
    await feed.send(event(1), msg_id="1")
    await feed.send(event(2), msg_id="2")
    third = asyncio.create_task(feed.send(event(3), msg_id="3"))
    await asyncio.sleep(0.05)
    assert not third.done(), "the third waits for a slot"
    bus.release.set()
    await asyncio.wait_for(third, 5)
    await feed.drain(5.0)
    assert [m for _, _, m in bus.published] == ["1", "2", "3"]


async def test_a_refused_publish_is_retried_with_the_same_msg_id() -> None:
    bus = FakeBus(fail=2)
    bus.release.set()
    feed = EventFeed(bus, backoff=0.01)  # type: ignore[arg-type]
    await feed.send(event(1), msg_id="acc-m1")
    await feed.drain(5.0)
    assert [m for _, _, m in bus.published] == ["acc-m1"]


async def test_a_lost_event_is_logged_and_drain_gives_up_in_time(caplog) -> None:  # type: ignore[no-untyped-def]
    bus = FakeBus(fail=5)
    bus.release.set()
    feed = EventFeed(bus, attempts=2, backoff=0.01)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        await feed.send(event(1), msg_id="acc-m1")
        await feed.drain(5.0)
    assert bus.published == [] and "accepted event for m1 not published" in caplog.text
    stuck = FakeBus()  # never acknowledges
    feed = EventFeed(stuck)  # type: ignore[arg-type]
    await feed.send(event(2), msg_id="acc-m2")
    await feed.drain(0.05)
    assert "1 event(s) not published before stopping" in caplog.text


def test_event_json_is_what_asdict_gave() -> None:
    full = Event(
        kind="bounced",
        message_id="m",
        account="acme",
        recipients=["a@x.test", "b@x.test"],
        reply=Reply(550, "5.1.1", "unknown", "RCPT").to_dict(),
        detail={"bounce_category": "bad-mailbox"},
        attempt=2,
    )
    assert full.to_json() == json.dumps(asdict(full), separators=(",", ":")).encode()
    assert Event.from_json(full.to_json()) == full

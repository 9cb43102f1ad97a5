"""The accepted event after the 250 goes through `events.report_later`: the caller does not wait for
its ack, a refused publish is asked again (same msg id) for a while, and a stop waits for what is
in flight only up to a grace period. Also: the event's JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Any

from services.core import events
from services.core.bus import BrokerUnavailable, Bus
from services.core.events import Event, report_later
from services.core.outcome import Reply


class FakeBus(Bus):
    """A Bus whose publishes block until `release` is set; the first `fail` are refused."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__(nc=None, js=None, publish_timeout=1.0)  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.published: list[tuple[str, bytes, str | None]] = []
        self.fail = fail

    async def publish(self, subject: str, payload: bytes, *, msg_id: str | None = None, **_: Any) -> None:
        await self.release.wait()
        if self.fail:
            self.fail -= 1
            raise BrokerUnavailable("not now")
        self.published.append((subject, payload, msg_id))


def event(n: int) -> Event:
    return Event(kind="accepted", message_id=f"m{n}", account="acme", recipients=["r@alpha.test"])


async def send(bus: FakeBus, n: int) -> None:
    """What `Handoff.queue` does after the 250."""
    await report_later(bus, event(n), msg_id=f"acc-m{n}", what=f"accepted event of m{n}", record=False)


async def test_the_caller_does_not_wait_for_the_ack_and_flush_does() -> None:
    bus = FakeBus()
    await send(bus, 1)
    assert bus.published == []
    bus.release.set()
    await bus.flush(5.0)
    ((subject, payload, msg_id),) = bus.published
    assert subject == "relais.events.acme.accepted" and msg_id == "acc-m1"
    assert json.loads(payload)["message_id"] == "m1"


async def test_a_refused_publish_is_asked_again_with_the_same_msg_id() -> None:
    bus = FakeBus(fail=1)
    bus.release.set()
    await send(bus, 1)
    await bus.flush(5.0)
    assert [m for _, _, m in bus.published] == ["acc-m1"]


async def test_a_lost_event_is_logged_and_flush_gives_up_in_time(caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bus = FakeBus(fail=100)
    bus.release.set()
    monkeypatch.setattr(events, "ACK_PATIENCE", 0.0)
    with caplog.at_level(logging.WARNING):
        await send(bus, 1)
        await bus.flush(5.0)
    assert bus.published == [] and "accepted event of m1 lost" in caplog.text
    stuck = FakeBus()  # never acknowledges
    await send(stuck, 2)
    await asyncio.wait_for(stuck.flush(0.05), 2.0)
    assert "1 background publish(es) not done before stopping" in caplog.text


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

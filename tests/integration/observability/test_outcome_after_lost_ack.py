"""An outcome whose event was stored but whose ack was lost is still counted and logged, once.

`settle` publishes again when JetStream does not acknowledge in time; the stream may have stored
the first publish all the same, and then answers the second as a duplicate. The duplicate is not
recorded (a redelivered stage must not count twice), so the outcome was recorded by nobody: no
`relais_recipients_total`, no JSON outcome line, no span event, for a recipient that was delivered.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from nats.js.api import PubAck

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, Bus
from services.core.config import RetryConfig
from services.core.disposition import settle
from services.core.envelope import Envelope
from services.core.events import event_log
from services.core.outcome import Delivered, Reply
from tests.support.prom import scrape, value
from tests.support.relais import SENDER_DOMAIN, an_envelope

OK = Reply(250, "2.0.0", "Ok: queued", "DATA")


@dataclasses.dataclass
class AckLostOnce(Bus):
    """A real bus whose first publish to `subject_prefix` is stored by JetStream but whose ack
    never arrives (the stream leader answered after the deadline): what a timeout looks like."""

    subject_prefix: str = "relais.events."
    lost: int = 0

    async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> PubAck:
        ack = await super().publish(subject, payload, **kwargs)
        if subject.startswith(self.subject_prefix) and not self.lost:
            self.lost += 1
            raise BrokerUnavailable(f"publish to {subject}: ack lost", maybe_stored=True)
        return ack


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _envelope(message_id: str, pool: str) -> Envelope:
    return an_envelope(
        "r@x.test",
        id=message_id,
        job_id=f"{message_id}-x",
        sender=f"s@{SENDER_DOMAIN}",
        pool=pool,
        site="x.test",
        received_at=time.time(),
    )


@pytest.fixture
def outcome_lines() -> Iterator[_Lines]:
    handler = _Lines()
    level = event_log.level
    event_log.addHandler(handler)
    event_log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        event_log.removeHandler(handler)
        event_log.setLevel(level)


async def test_a_delivery_whose_event_ack_was_lost_is_counted_and_logged_once(
    topology_bus: Bus, outcome_lines: _Lines
) -> None:
    pool = "lost-ack-pool"  # this test's own: the registry is shared by the whole process
    bus = AckLostOnce(nc=topology_bus.nc, js=topology_bus.js, publish_timeout=topology_bus.publish_timeout)
    env = _envelope("m-lost-ack", pool)
    before = scrape()
    await settle(bus, BodyStore(bus.js, 128 * 1024), RetryConfig(), env, [Delivered("r@x.test", OK)])
    after = scrape()
    assert bus.lost == 1, "the first publish of the event was stored, its ack lost"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relais_recipients_total", outcome="delivered", pool=pool) == 1
    lines: list[Mapping[str, Any]] = [
        getattr(r, "event", {}) for r in outcome_lines.records if getattr(r, "message_id", "") == env.id
    ]
    assert [line.get("outcome") for line in lines] == ["delivered"]


async def test_an_event_stored_by_an_earlier_run_is_still_not_counted_again(topology_bus: Bus) -> None:
    # The other side of the fix: a stage redelivered to this process (no lost ack here) that
    # publishes the same event again must not count it again.
    pool = "lost-ack-dup-pool"
    env = _envelope("m-dup-ack", pool)
    bodies = BodyStore(topology_bus.js, 128 * 1024)
    before = scrape()
    for _ in range(2):
        await settle(topology_bus, bodies, RetryConfig(), env, [Delivered("r@x.test", OK)])
    after = scrape()
    delivered = value(after, "relais_recipients_total", outcome="delivered", pool=pool) - value(
        before, "relais_recipients_total", outcome="delivered", pool=pool
    )
    assert delivered == 1

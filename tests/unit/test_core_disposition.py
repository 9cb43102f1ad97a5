"""`settle`: one attempt's outcomes decide one fate per recipient, however often it is published."""

from __future__ import annotations

import random
from collections.abc import Coroutine, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from services.core import bus as transport
from services.core import disposition
from services.core.bus import BrokerUnavailable
from services.core.config import RetryConfig
from services.core.envelope import BodyRef, BounceNotice, Envelope
from services.core.outcome import Bounced, Deferred, Reply
from services.core.topology import bounce_subject

USER_UNKNOWN = Reply(550, "5.1.1", "User unknown", "RCPT")
NOT_NOW = Reply(450, "4.1.1", "User unknown", "RCPT")


class FlakyBus:
    """Records every publish; the first one times out although it was stored (`maybe_stored`)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, *, headers: Any = None, **_: Any) -> None:
        self.published.append((subject, payload, dict(headers or {})))
        if len(self.published) == 1:
            raise BrokerUnavailable("no ack before the timeout", maybe_stored=True)

    async def background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        work.close()  # the deferred event is not part of what a retry must decide the same


class Bodies:
    async def release(self, body: BodyRef, key: str) -> None:
        pass


def job(received_at: float = 0.0) -> Envelope:
    return Envelope(
        id="m1",
        job_id="m1-x",
        sender="s@acme.test",
        recipients=("a@x.test", "b@x.test"),
        account="acme",
        sender_domain="acme.test",
        body=BodyRef(size=1, inline=b"x"),
        received_at=received_at,
    )


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(_: float) -> None:
        pass

    monkeypatch.setattr(transport.asyncio, "sleep", no_sleep)


def moving_clock(monkeypatch: pytest.MonkeyPatch, start: float, step: float) -> None:
    ticks: Iterator[float] = (start + i * step for i in range(1_000))
    monkeypatch.setattr(disposition, "time", SimpleNamespace(time=lambda: next(ticks)))


async def test_a_repeated_attempt_near_max_age_does_not_expire_what_the_first_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first attempt's retry (1000 + 60) fits in max_age; one read of the clock 100 s later
    # would not, and would publish a bounce notice next to the retry already stored.
    moving_clock(monkeypatch, start=1000.0, step=100.0)
    bus = FlakyBus()
    retry = RetryConfig(base_delay=60.0, max_delay=60.0, jitter=0.0, max_age=1100.0)

    await disposition.settle(bus, Bodies(), retry, job(), [Deferred("a@x.test", NOT_NOW)])  # type: ignore[arg-type]

    assert [subject for subject, _, _ in bus.published].count(bounce_subject()) == 0
    first, second = bus.published
    assert first == second, "the retry is published again exactly as before"


async def test_a_repeated_attempt_draws_the_same_jitter() -> None:
    bus = FlakyBus()
    retry = RetryConfig(base_delay=3600.0, max_delay=3600.0, jitter=0.5)

    await disposition.settle(
        bus,  # type: ignore[arg-type]
        Bodies(),  # type: ignore[arg-type]
        retry,
        job(received_at=1000.0),
        [Deferred("a@x.test", NOT_NOW)],
        now=1000.0,
        rng=random.Random(7),
    )

    first, second = bus.published
    assert first[2]["Nats-Schedule"] == second[2]["Nats-Schedule"]
    assert first == second


async def test_expiry_is_marked_on_the_expired_recipients_only() -> None:
    bus = FlakyBus()
    retry = RetryConfig(base_delay=60.0, max_delay=60.0, jitter=0.0, max_age=10.0)

    await disposition.settle(
        bus,  # type: ignore[arg-type]
        Bodies(),  # type: ignore[arg-type]
        retry,
        job(received_at=1000.0),
        [Bounced("a@x.test", USER_UNKNOWN), Deferred("b@x.test", NOT_NOW)],
        now=1010.0,  # max_age old: the attempt was the last
    )

    notice = BounceNotice.from_msgpack(bus.published[-1][1])
    assert {f.recipient: f.expired for f in notice.failures} == {"a@x.test": False, "b@x.test": True}
    assert notice.failures[1].reply.enhanced_status == "4.4.7"


class EventlessBus(transport.Bus):
    """A Bus whose first `refuse` publishes of an event go unanswered; every other is stored.
    Its background publishes run as in every service."""

    def __init__(self, refuse: int) -> None:
        super().__init__(nc=None, js=None, publish_timeout=1.0)  # type: ignore[arg-type]
        self.refuse = refuse
        self.published: list[tuple[str, str | None]] = []

    async def publish(self, subject: str, payload: bytes, *, headers: Any = None, **kw: Any) -> Any:
        if subject.startswith("relais.events.") and self.refuse:
            self.refuse -= 1
            raise BrokerUnavailable("no answer: a leader election")
        self.published.append((subject, kw.get("msg_id")))
        return SimpleNamespace(duplicate=False)


async def test_a_deferred_event_is_asked_again_while_jetstream_does_not_answer() -> None:
    # The retry is stored, so the job is acked: an event refused once was lost for good, and
    # webhooks and `relais message` never heard of the deferral.
    bus = EventlessBus(refuse=2)
    retry = RetryConfig(base_delay=60.0, max_delay=60.0, jitter=0.0)

    await disposition.settle(bus, Bodies(), retry, job(), [Deferred("a@x.test", NOT_NOW)], now=0.0)  # type: ignore[arg-type]
    await bus.flush(5.0)

    assert ("relais.events.acme.deferred", "dfr-m1-x-1") in bus.published

"""An ingress host whose clock is off the NATS servers' (a VM after a suspend, NTP broken).

The router drops a submission stored after its `accept_by` (`Envelope.refused_when_stored_at`):
the ingress had answered `451` by then, and the client sends it again. It compares `accept_by`
with the time the stream stored the copy, by the server's clock. So the ingress writes
`accept_by` in the servers' clock (`services.ingress.server_clock`): a message it answered `250`
is delivered whichever way its own clock is off, and a copy stored after a `451` is still
dropped. The nats-server keeps the real clock; only the ingress's modules read a skewed one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, connect
from services.core.envelope import Envelope
from services.core.topology import submit_subject
from services.ingress.handoff import Handoff, Submission
from services.ingress.server_clock import ServerClock
from tests.support.clock import skew_ingress_clock
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, asubmit, message, wait_for_events

# Both ways, past what the router's margin and `ingress.queue_timeout` (30 s) absorb together.
SKEWS = [-60.0, 60.0]


@pytest.mark.parametrize("skew", SKEWS, ids=["behind", "ahead"])
async def test_a_message_answered_250_is_delivered_whatever_the_ingress_clock(
    make_stack: Callable[..., Any],
    make_sink: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    skew: float,
) -> None:
    skew_ingress_clock(monkeypatch, skew)
    stack = await make_stack()
    sink = make_sink("127.0.0.2")

    code, reply = await asubmit(stack.smtp_address, recipients=["bob@alpha.test"], data=message())
    assert code == 250, reply

    (got,) = await sink.async_wait_for(1, timeout=15)
    assert got.rcpt_tos == ["bob@alpha.test"]
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert stack.ingress is not None
    assert stack.ingress.clock.offset == pytest.approx(-skew, abs=1.0), "measured before the first message"


SUBMISSION = Submission(
    account=ACCOUNT,
    sender=f"news@{SENDER_DOMAIN}",
    recipients=("bob@alpha.test",),
    sender_domain=SENDER_DOMAIN,
    data=message(),
)


def router_said(caplog: pytest.LogCaptureFixture, message_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "services.router.service" and message_id in r.getMessage()]


@pytest.mark.parametrize("skew", SKEWS, ids=["behind", "ahead"])
async def test_a_copy_stored_after_the_451_is_still_dropped(
    make_stack: Callable[..., Any],
    make_sink: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    skew: float,
) -> None:
    """The publish is never acknowledged in time (`451`); its copy is stored later, as a publish
    flushed after a reconnect is: the router drops it, and says so as an error."""
    skew_ingress_clock(monkeypatch, skew)
    stack = await make_stack(services=("router", "delivery"))
    sink = make_sink("127.0.0.2")
    bus = await connect(stack.config.nats, "test-late-copy")
    try:
        clock = ServerClock(bus)
        assert await clock.sample()
        handoff = Handoff(
            bus, BodyStore(bus.js, 64 * 1024), publish_timeout=0.5, queue_timeout=1.0, clock=clock
        )
        held: list[bytes] = []

        async def never_acked(subject: str, payload: bytes, **kwargs: Any) -> None:
            held.append(payload)
            raise BrokerUnavailable("ack lost", maybe_stored=True)

        monkeypatch.setattr(bus, "publish", never_acked)
        reply = await handoff.queue(SUBMISSION)
        answered_at = time.time()  # by the servers' clock: the test's is theirs
        assert reply.startswith("451 4.3.0"), reply
        late = Envelope.from_msgpack(held[0])
        assert late.accept_by == pytest.approx(answered_at, abs=1.0), "the 451's time, by the servers' clock"

        # Stored past the router's 2 s margin after the 451, by the servers' clock.
        await asyncio.sleep(3.0)
        with caplog.at_level(logging.ERROR, logger="services.router.service"):
            await bus.js.publish(submit_subject(), held[0])
            said: list[logging.LogRecord] = []
            for _ in range(100):
                if said := router_said(caplog, late.id):
                    break
                await asyncio.sleep(0.1)
        assert len(said) == 1, "the router took the late copy and dropped it"
        (dropped,) = said
        assert dropped.levelno == logging.ERROR and "stored too late" in dropped.getMessage()
        await asyncio.sleep(1.0)
        assert sink.messages == [], "the client's retry is the one delivered"
    finally:
        await bus.close()

"""A replica stopping while the events stream does not answer: a hand-off waiting for room to
report its message's `accepted` event (at most `BACKGROUND_MAX` are in flight) stops waiting by
the stop's bound for hand-offs, and its event is logged as lost. Nothing the ingress publishes
outlives its `stop()`, after which NATS is closed.

Before, the wait for room had no end of its own: `stop()` gave up on the session at its bound
and went on, its flush cancelled the events in flight, and the room that freed let the waiting
hand-off start its event after the flush, while NATS was being closed: a publish that the stop
no longer accounted for (and, beyond the room freed, events never sent nor reported lost).

The clients, the ingress and nats-server are real. Only the moment is arranged: the room is one
event, and event publishes are held (a leader election on the events stream) until the test ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from services.core import bus as transport
from services.core.topology import event_subject
from services.ingress.service import IngressService
from tests.integration.ingress.helpers import hold_data, in_thread, queued, settle, submit
from tests.integration.ingress.test_quota_client_leaves_during_handoff import _gone, _reset, _stuffed
from tests.support.relais import ACCOUNT, message


class HeldEvents:
    """Event publishes held until `release`, and the msg ids of those still held."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight: set[str] = set()


def hold_events(service: IngressService, held: HeldEvents) -> None:
    bus = service._handoff._bus
    real = bus.publish
    events = event_subject(ACCOUNT, "accepted")

    async def publish(subject: str, payload: bytes, **kwargs: Any) -> Any:
        if subject != events:
            return await real(subject, payload, **kwargs)
        msg_id = kwargs.get("msg_id") or ""
        held.in_flight.add(msg_id)
        try:
            await held.release.wait()
            return await real(subject, payload, **kwargs)
        finally:
            held.in_flight.discard(msg_id)

    bus.publish = publish  # type: ignore[method-assign]


async def test_a_hand_off_waiting_for_room_for_its_event_ends_within_the_stop(
    make_ingress: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(transport, "BACKGROUND_MAX", 1)  # read when the bus first needs room
    stack = await make_ingress(nats={"publish_timeout": 1.0})
    service: IngressService = stack.ingress
    held = HeldEvents()
    hold_events(service, held)
    url = stack.config.nats.url
    try:
        # The first message's event takes the only room, and is not answered.
        code, text = await in_thread(submit, stack.smtp_address, message())
        assert code == 250, text
        first = text.decode().rpartition(" ")[2]
        assert await settle(lambda: held.in_flight == {f"acc-{first}"})

        # The second is queued, its hand-off waits for room; its client gives up and resets.
        sock = await in_thread(hold_data, stack.smtp_address, _stuffed(message()))
        try:
            for _ in range(250):
                if len(await queued(url)) == 2:
                    break
                await asyncio.sleep(0.02)
            [session] = service._connections
            task = session._handler_coroutine
            assert task is not None and not task.done()
        finally:
            _reset(sock)
        assert await settle(lambda: _gone(session)), "the ingress never saw the client leave"
        [second] = [env.id for env in await queued(url) if env.id != first]

        with caplog.at_level(logging.WARNING, logger="services.ingress.handoff"):
            await stack.stop()
        assert task.done(), "the session outlived the stop"
        assert held.in_flight == set(), "an event publish outlived the stop"
        assert f"accepted event of {second} lost" in caplog.text
    finally:
        held.release.set()

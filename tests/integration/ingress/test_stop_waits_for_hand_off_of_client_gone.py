"""A replica stopping (rolling update) while a client that reset its connection after the final dot
still has its message being handed over: `stop()` waits for that hand-off before NATS is closed,
so the message ends queued, counted in its account's rate and announced (`accepted`), never
counted without being queued.

Such a session is no longer among the replica's connections (its connection is lost), yet its
hand-off runs on to its end (`past_the_client`). Before, `stop()` waited for connections only:
it returned at once, the bus was closed under the hand-off, the envelope's publish failed and
so did the refund of the rate counters (the quota taken by a message never queued), or, with the
envelope already stored, its `accepted` event was never sent.

The client, the ingress and nats-server are real. Only the moment is arranged: the hand-off's
step is held, after JetStream acknowledged it, until `stop()` either returned and closed the bus
(what happened before) or says it waits for the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import AccountConfig
from services.ingress.replies import DAILY_LIMIT
from services.ingress.service import IngressService
from tests.integration.ingress.helpers import hold_data, in_thread, queued, reply, send_counted, settle
from tests.integration.ingress.test_quota_client_leaves_during_handoff import (
    HeldStep,
    _gone,
    _reset,
    _stuffed,
    hold_counter,
    hold_envelope,
)
from tests.support.relais import ACCOUNT, message, password_hash, wait_for_events


class _WaitingForSessions(logging.Handler):
    """Sets `seen` when the ingress logs that its stop waits for sessions still running."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("stopping: waiting for"):
            self.seen.set()


async def stop_until_it_waits(stack: Any, waiting: _WaitingForSessions) -> asyncio.Task[None]:
    """Start the stop, and return once it waits for what is left running (or has ended)."""
    stopping = asyncio.create_task(stack.stop())
    seen = asyncio.create_task(waiting.seen.wait())
    await asyncio.wait({stopping, seen}, return_when=asyncio.FIRST_COMPLETED)
    seen.cancel()
    return stopping


@pytest.fixture
def stop_waiting() -> Any:
    handler = _WaitingForSessions()
    logger = logging.getLogger("services.ingress.service")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("step", [hold_counter, hold_envelope], ids=["counting", "queueing"])
async def test_stop_waits_for_the_hand_off_of_a_client_that_left(
    make_ingress: Callable[..., Any],
    stop_waiting: _WaitingForSessions,
    step: Callable[[IngressService, HeldStep], None],
) -> None:
    account = AccountConfig(password_hash=password_hash(), domains=["acme.test"], max_messages_per_day=1)
    stack = await make_ingress(accounts={ACCOUNT: account})
    service: IngressService = stack.ingress
    held = HeldStep()
    step(service, held)

    sock = await in_thread(hold_data, stack.smtp_address, _stuffed(message()))
    try:
        assert await asyncio.to_thread(held.entered.wait, 30), "the hand-off never reached the step"
        [session] = service._connections
        task = session._handler_coroutine
        assert task is not None
        _reset(sock)
        assert await settle(lambda: _gone(session)), "the ingress never saw the client leave"
        assert not service._connections

        # The replica stops as `relais ingress` does: the service, then its NATS connection.
        stopping = await stop_until_it_waits(stack, stop_waiting)
    finally:
        held.release.set()
        with contextlib.suppress(OSError):
            sock.close()
    await asyncio.wait_for(stopping, 30)
    await asyncio.wait({task}, timeout=30)  # before the fix, the hand-off was still failing here
    assert task.done()

    envelopes = await queued(stack.config.nats.url)
    assert len(envelopes) == 1, "the message was not queued"
    [env] = envelopes
    accepted = await wait_for_events(stack.config.nats.url, "accepted", 1, timeout=10, account=ACCOUNT)
    assert [event.message_id for event in accepted] == [env.id]
    # Counted too: the day's one message is used, on any replica.
    other = await make_ingress(accounts={ACCOUNT: account})
    assert await in_thread(send_counted, other.smtp_address, None) == reply(DAILY_LIMIT)

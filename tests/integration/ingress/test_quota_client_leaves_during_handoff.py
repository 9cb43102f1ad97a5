"""A client that leaves once it has sent a message's final dot, while the ingress is still handing
the message to JetStream: the hand-off goes on to its end, so the message is queued *and*
counted in its account's rate, never one without the other.

Leaving cancels the session when the connection is reset, or closed over TLS (which cannot
half-close). A plain TCP close is taken as a half-close, whose replies are still owed
(test_half_close): that case never cancelled the hand-off, and is here to show it.
Before, that cancellation cut the hand-off wherever it was: with the envelope already stored,
the quota was refunded (a message delivered without counting against the limit) and its
`accepted` event never published; during the counters' increments, they stayed for a message
that was never queued.

The client, the ingress and nats-server are real. Only the moment is arranged: the step named
by each case is held, after JetStream acknowledged it, until the ingress has seen the client go.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import AccountConfig
from services.core.topology import submit_subject
from services.ingress.replies import DAILY_LIMIT
from services.ingress.service import IngressService
from tests.integration.ingress.helpers import (
    client,
    hold_data,
    in_thread,
    login,
    queued,
    reply,
    send_counted,
    settle,
    tls_sections,
)
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, message, password_hash, wait_for_events


class HeldStep:
    """One step of the hand-off, held once it has been done until `release` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = asyncio.Event()

    async def hold(self) -> None:
        self.entered.set()
        await self.release.wait()


def hold_counter(service: IngressService, held: HeldStep) -> None:
    """Hold the message's increment of its hourly counter (the day's goes on)."""
    counters = service._rates._counters
    real = counters.add

    async def add(subject: str, delta: int = 1, **kwargs: Any) -> int:
        value = await real(subject, delta, **kwargs)
        if delta > 0 and ".msg-hour." in subject:
            await held.hold()
        return value

    counters.add = add  # type: ignore[method-assign]


def hold_envelope(service: IngressService, held: HeldStep) -> None:
    """Hold the envelope's publish to the submit stream, once JetStream has stored it."""
    bus = service._handoff._bus
    real = bus.publish

    async def publish(subject: str, payload: bytes, **kwargs: Any) -> Any:
        ack = await real(subject, payload, **kwargs)
        if subject == submit_subject():
            await held.hold()
        return ack

    bus.publish = publish  # type: ignore[method-assign]


def _stuffed(body: bytes) -> bytes:
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: close() sends RST, as a client killed or timing out with unread data does.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _over_tls_to_final_dot(address: tuple[str, int], pki: TestPKI) -> smtplib.SMTP:
    smtp = client(address, pki=pki, starttls=True)
    login(smtp)
    smtp.mail("news@acme.test")
    smtp.rcpt("a@alpha.test")
    code, _ = smtp.docmd("DATA")
    assert code == 354
    smtp.send(_stuffed(message()))
    return smtp


def _gone(session: Any) -> bool:
    """Whether the ingress has seen the client leave: its connection lost, or its side shut."""
    return session.transport is None or session._half_closed


async def leave_while_held(service: IngressService, held: HeldStep, leave: Callable[[], None]) -> None:
    """Once the hand-off reached the held step: the client leaves, the ingress sees it go, the
    step goes on, and the session's task runs to its end."""
    try:
        assert await asyncio.to_thread(held.entered.wait, 30), "the hand-off never reached the step"
        [session] = service._connections
        task = session._handler_coroutine
        assert task is not None
        leave()
        assert await settle(lambda: _gone(session)), "the ingress never saw the client leave"
    finally:
        held.release.set()
        with contextlib.suppress(OSError):
            leave()  # a no-op unless the test failed before the client left
    await asyncio.wait({task}, timeout=30)
    assert task.done()


@pytest.mark.parametrize("step", [hold_counter, hold_envelope], ids=["counting", "queueing"])
@pytest.mark.parametrize("leaving", ["close", "reset", "tls-close"])
async def test_a_message_whose_client_left_during_the_hand_off_is_queued_and_counted(
    make_ingress: Callable[..., Any],
    pki: TestPKI,
    step: Callable[[IngressService, HeldStep], None],
    leaving: str,
) -> None:
    over_tls = leaving == "tls-close"
    account = AccountConfig(password_hash=password_hash(), domains=["acme.test"], max_messages_per_day=1)
    stack = await make_ingress(accounts={ACCOUNT: account}, ingress=tls_sections(pki) if over_tls else {})
    service: IngressService = stack.ingress
    held = HeldStep()
    step(service, held)

    if over_tls:
        smtp = await in_thread(_over_tls_to_final_dot, stack.smtp_address, pki)
        leave: Callable[[], None] = smtp.close
    else:
        sock = await in_thread(hold_data, stack.smtp_address, _stuffed(message()))
        leave = (lambda: _reset(sock)) if leaving == "reset" else sock.close
    await leave_while_held(service, held, leave)

    [env] = await queued(stack.config.nats.url)
    # Queued, so accepted: webhooks and `relais message` hear of it like of any other.
    accepted = await wait_for_events(stack.config.nats.url, "accepted", 1, timeout=10, account=ACCOUNT)
    assert [event.message_id for event in accepted] == [env.id]
    # The day's one message was used by the message queued: the next is refused.
    assert await in_thread(send_counted, stack.smtp_address, pki if over_tls else None) == reply(DAILY_LIMIT)
    assert len(await queued(stack.config.nats.url)) == 1

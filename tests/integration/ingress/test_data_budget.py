"""The DATA byte budget of one ingress process (ingress.max_buffered_bytes): concurrent messages
that would not fit are read to their end and refused with 452 4.3.1, as Postfix refuses when its
queue is short of space; nothing of them is queued and the session goes on. Sessions that did
not authenticate share only part of it, so anonymous clients cannot refuse every account's mail."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from services.core import metrics
from services.ingress.replies import INSUFFICIENT_STORAGE, LOCAL_ERROR, MESSAGE_TOO_BIG
from tests.integration.ingress.helpers import (
    client,
    hold_data,
    hold_inbound,
    in_thread,
    listening,
    login,
    queued,
    read_replies,
    reply,
    settle,
    submit,
)
from tests.support.relais import message

LINE = b"x" * 78 + b"\r\n"


def _big(subject: str, octets: int) -> bytes:
    return message(subject=subject, body=(LINE * (octets // len(LINE))).decode())


async def test_concurrent_messages_beyond_the_budget(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_message_size": 20_000, "max_buffered_bytes": 30_000})
    budget = ingress.ingress.budget
    first, second = _big("first", 16_000), _big("second", 18_000)

    # Session A sends most of its message and waits: it holds ~15 KB of the budget.
    a = await in_thread(hold_data, ingress.smtp_address, first[:15_000])
    assert await settle(lambda: budget.used >= 14_000)
    assert metrics.REGISTRY.get_sample_value("relais_ingress_buffered_bytes") == budget.used

    b = await in_thread(client, ingress.smtp_address)

    def b_while_a_holds() -> list[tuple[int, bytes]]:
        login(b)
        declared = b.mail("news@acme.test", ["SIZE=18000"])  # more than is free now
        b.rset()
        too_big = b.mail("news@acme.test", ["SIZE=25000"])  # more than max_message_size
        b.rset()
        b.mail("news@acme.test")
        b.rcpt("b@alpha.test")
        return [declared, too_big, b.data(second)]

    declared, too_big, refused = await in_thread(b_while_a_holds)
    assert declared == reply(INSUFFICIENT_STORAGE) and too_big == reply(MESSAGE_TOO_BIG)
    assert refused == reply(INSUFFICIENT_STORAGE)  # after its final dot, the whole message read
    assert 14_000 <= budget.used <= 15_000  # B's refused message holds nothing

    a.sendall(first[15_000:] + b"\r\n.\r\n")
    assert (await in_thread(read_replies, a, 1))[0].startswith(b"250 2.0.0 Ok: queued")
    assert await settle(lambda: budget.used == 0)

    def b_again() -> tuple[int, bytes]:
        b.mail("news@acme.test", ["SIZE=18000"])
        b.rcpt("b@alpha.test")
        return b.data(second)

    try:
        assert (await in_thread(b_again))[0] == 250  # the same session, now that there is room
        await in_thread(b.quit)
    finally:
        a.close()
        b.close()
    # Nothing of B's refused message reached the stream: A's message, then B's second.
    bodies = [e.body.inline or b"" for e in await queued(ingress.config.nats.url)]
    assert len(bodies) == 2 and b"Subject: first\r\n" in bodies[0] and b"Subject: second\r\n" in bodies[1]
    assert budget.used == 0


async def test_every_way_out_of_data_gives_the_reservation_back(
    make_ingress: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ingress = await make_ingress(ingress={"max_message_size": 20_000, "max_buffered_bytes": 30_000})
    budget = ingress.ingress.budget

    assert await in_thread(submit, ingress.smtp_address, _big("too big", 25_000)) == reply(MESSAGE_TOO_BIG)
    assert budget.used == 0

    async def fails(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("an unexpected fault while queueing")

    with monkeypatch.context() as patch:
        patch.setattr(ingress.ingress._handoff, "queue", fails)
        assert await in_thread(submit, ingress.smtp_address, _big("fails", 16_000)) == reply(LOCAL_ERROR)
    assert budget.used == 0

    # A client that goes away in the middle of its message.
    sock = await in_thread(hold_data, ingress.smtp_address, _big("gone", 16_000)[:12_000])
    assert await settle(lambda: budget.used >= 11_000)
    sock.close()
    assert await settle(lambda: budget.used == 0)
    assert await queued(ingress.config.nats.url) == []


async def test_a_timeout_during_data_gives_the_reservation_back(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(
        ingress={"max_message_size": 20_000, "max_buffered_bytes": 30_000, "command_timeout": 0.5}
    )
    budget = ingress.ingress.budget
    with await in_thread(hold_data, ingress.smtp_address, _big("slow", 16_000)[:12_000]):
        assert await settle(lambda: budget.used >= 11_000)
        assert await settle(lambda: budget.used == 0)  # the session timed out and was closed


LOCAL = "bounces.relais.test"


async def test_anonymous_inbound_clients_cannot_starve_authenticated_submission(
    make_ingress: Callable[..., Any],
) -> None:
    stack, [submission, inbound] = await listening(
        make_ingress,
        {"max_message_size": 20_000, "max_buffered_bytes": 30_000, "local_domains": [LOCAL]},
        {"mode": "submission"},
        {"mode": "inbound"},
    )
    budget = stack.ingress.budget
    held = [await in_thread(hold_inbound, inbound, 14_800) for _ in range(2)]
    try:
        assert await settle(lambda: budget.anonymous >= 14_000)
        await asyncio.sleep(0.3)  # the second one's octets arrive too, and are refused
        assert budget.anonymous <= budget.anonymous_share == 20_000, budget.anonymous

        def declare_then_send() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with client(submission) as smtp:
                login(smtp)
                declared = smtp.mail("news@acme.test", ["SIZE=2000"])
                smtp.rset()
                smtp.mail("news@acme.test")
                smtp.rcpt("a@alpha.test")
                return declared, smtp.data(
                    b"From: <news@acme.test>\r\nSubject: s\r\n\r\n" + b"small body line\r\n" * 60
                )

        declared, data = await in_thread(declare_then_send)
        # Two anonymous port-25 clients, who need no credentials, held the whole budget (for
        # up to command_timeout, then again), and every account's mail got 452 4.3.1.
        assert declared != reply(INSUFFICIENT_STORAGE) and data[0] == 250, (declared, data)
    finally:
        for sock in held:
            sock.close()

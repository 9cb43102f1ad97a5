"""The DATA byte budget of one ingress process (ingress.max_buffered_bytes): concurrent messages
that would not fit are read to their end and refused with 452 4.3.1, as Postfix refuses when its
queue is short of space; nothing of them is queued and the session goes on. Sessions that did
not authenticate share only part of it, so anonymous clients cannot refuse every account's mail."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.ingress.replies import INSUFFICIENT_STORAGE, LOCAL_ERROR, MESSAGE_TOO_BIG
from tests.integration.ingress.helpers import (
    client,
    free_listen,
    in_thread,
    listener,
    login,
    plain,
    queued,
    reply,
)
from tests.support.relais import ACCOUNT, PASSWORD, message

LINE = b"x" * 78 + b"\r\n"


def _big(subject: str, octets: int) -> bytes:
    return message(subject=subject, body=(LINE * (octets // len(LINE))).decode())


def _replies(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while len(lines := [x for x in data.split(b"\r\n")[:-1] if x[3:4] == b" "]) < count:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return lines


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("never happened")


async def test_concurrent_messages_beyond_the_budget(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_message_size": 20_000, "max_buffered_bytes": 30_000})
    budget = ingress.ingress.budget
    first, second = _big("first", 16_000), _big("second", 18_000)

    # Session A sends most of its message and waits: it holds ~15 KB of the budget.
    a = socket.create_connection(ingress.smtp_address, timeout=10)
    a.sendall(
        f"EHLO a.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()
        + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
    )
    assert (await in_thread(_replies, a, 6))[-1].startswith(b"354")
    a.sendall(first[:15_000])
    await _until(lambda: budget.used >= 14_000)

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
    assert (await in_thread(_replies, a, 1))[0].startswith(b"250 2.0.0 Ok: queued")
    await _until(lambda: budget.used == 0)

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

    def send(data: bytes) -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            smtp.rcpt("a@alpha.test")
            return smtp.data(data)

    assert await in_thread(send, _big("too big", 25_000)) == reply(MESSAGE_TOO_BIG)
    assert budget.used == 0

    async def fails(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("an unexpected fault while queueing")

    with monkeypatch.context() as patch:
        patch.setattr(ingress.ingress._handoff, "queue", fails)
        assert await in_thread(send, _big("fails", 16_000)) == reply(LOCAL_ERROR)
    assert budget.used == 0

    # A client that goes away in the middle of its message.
    sock = socket.create_connection(ingress.smtp_address, timeout=10)
    sock.sendall(
        f"EHLO a.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()
        + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
    )
    assert (await in_thread(_replies, sock, 6))[-1].startswith(b"354")
    sock.sendall(_big("gone", 16_000)[:12_000])
    await _until(lambda: budget.used >= 11_000)
    sock.close()
    await _until(lambda: budget.used == 0)
    assert await queued(ingress.config.nats.url) == []


async def test_a_timeout_during_data_gives_the_reservation_back(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(
        ingress={"max_message_size": 20_000, "max_buffered_bytes": 30_000, "command_timeout": 0.5}
    )
    budget = ingress.ingress.budget
    sock = socket.create_connection(ingress.smtp_address, timeout=10)
    with sock:
        sock.sendall(
            f"EHLO a.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()
            + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
        )
        assert (await in_thread(_replies, sock, 6))[-1].startswith(b"354")
        sock.sendall(_big("slow", 16_000)[:12_000])
        await _until(lambda: budget.used >= 11_000)
        await _until(lambda: budget.used == 0)  # the session timed out and was closed


LOCAL = "bounces.relais.test"


def _inbound_replies(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while len(finals := [x for x in data.split(b"\r\n")[:-1] if x[3:4] == b" "]) < count:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return finals


def _hold_inbound(address: tuple[str, int], octets: int) -> socket.socket:
    """An anonymous port-25 client that sends most of a message to postmaster and stalls."""
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(b"EHLO anyone.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
    assert _inbound_replies(sock, 5)[-1].startswith(b"354")
    sock.sendall(b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * (octets // 80))
    return sock


async def test_anonymous_inbound_clients_cannot_starve_authenticated_submission(
    make_ingress: Callable[..., Any],
) -> None:
    submission, inbound = free_listen(), free_listen()
    stack = await make_ingress(
        ingress={
            "max_message_size": 20_000,
            "max_buffered_bytes": 30_000,
            "local_domains": [LOCAL],
            "listeners": [
                ListenerConfig(listen=submission, mode="submission"),
                ListenerConfig(listen=inbound, mode="inbound"),
            ],
        }
    )
    budget = stack.ingress.budget
    held = [await in_thread(_hold_inbound, listener(stack, inbound), 14_800) for _ in range(2)]
    try:
        await _until(lambda: budget.anonymous >= 14_000)
        await asyncio.sleep(0.3)  # the second one's octets arrive too, and are refused
        assert budget.anonymous <= budget.anonymous_share == 20_000, budget.anonymous

        def submit() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with client(listener(stack, submission)) as smtp:
                login(smtp)
                declared = smtp.mail("news@acme.test", ["SIZE=2000"])
                smtp.rset()
                smtp.mail("news@acme.test")
                smtp.rcpt("a@alpha.test")
                return declared, smtp.data(
                    b"From: <news@acme.test>\r\nSubject: s\r\n\r\n" + b"small body line\r\n" * 60
                )

        declared, data = await in_thread(submit)
        # Two anonymous port-25 clients, who need no credentials, held the whole budget (for
        # up to command_timeout, then again), and every account's mail got 452 4.3.1.
        assert declared != reply(INSUFFICIENT_STORAGE) and data[0] == 250, (declared, data)
    finally:
        for sock in held:
            sock.close()

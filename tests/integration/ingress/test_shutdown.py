"""Stopping a replica (rolling update): idle sessions hear 421 4.3.2, a DATA in progress finishes
with its 250 (after the JetStream ack), and nothing is half-accepted."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from services.ingress.replies import SHUTTING_DOWN
from tests.integration.ingress.helpers import client, in_thread, login, plain, queued, reply
from tests.support.relais import ACCOUNT, PASSWORD, message


async def test_stop_drains_sessions(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    half_sent = threading.Event()
    finish = threading.Event()

    def uploading() -> bytes:
        body = message(body="x" * 70 + "\r\n") * 50
        with socket.create_connection(ingress.smtp_address, timeout=30) as sock:
            sock.recv(200)
            sock.sendall(f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode())
            sock.sendall(b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n")
            received = b""
            while b"354 " not in received:
                received += sock.recv(4096)
            sock.sendall(body[: len(body) // 2])
            half_sent.set()
            finish.wait(10)
            sock.sendall(body[len(body) // 2 :] + b"\r\n.\r\n")
            answer = b""
            while not answer.endswith(b"\r\n"):
                answer += sock.recv(4096)
            return answer

    def idle_session() -> Any:
        smtp = client(ingress.smtp_address)
        login(smtp)
        return smtp

    idle = await in_thread(idle_session)
    upload = asyncio.create_task(in_thread(uploading))
    await in_thread(half_sent.wait, 10)
    stopping = asyncio.create_task(ingress.ingress.stop())
    await asyncio.sleep(0.5)
    assert not stopping.done(), "stop() must wait for the DATA in progress"
    # The idle session was told why it is being closed.
    assert await in_thread(idle.getreply) == reply(SHUTTING_DOWN)
    finish.set()
    answer = await upload
    assert answer.startswith(b"250 2.0.0 Ok: queued as "), answer
    await asyncio.wait_for(stopping, 10)
    assert len(await queued(ingress.config.nats.url)) == 1


async def test_stop_drains_sessions_where_wait_closed_waits_for_connections(
    make_ingress: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # From Python 3.12.1, Server.wait_closed waits until every connection has ended; on 3.11
    # it returns at once. Waiting for it before the drain left idle sessions without their 421
    # until the pod was killed.
    async def wait_closed_312(self: asyncio.base_events.Server) -> None:
        if self._waiters is None:  # type: ignore[attr-defined]
            return
        waiter = self._loop.create_future()  # type: ignore[attr-defined]
        self._waiters.append(waiter)  # type: ignore[attr-defined]
        await waiter

    monkeypatch.setattr(asyncio.base_events.Server, "wait_closed", wait_closed_312)
    ingress = await make_ingress()

    def idle_session() -> Any:
        smtp = client(ingress.smtp_address)
        login(smtp)
        return smtp

    idle = await in_thread(idle_session)
    stopping = asyncio.create_task(ingress.ingress.stop())
    assert await in_thread(idle.getreply) == reply(SHUTTING_DOWN)
    await asyncio.wait_for(stopping, 10)

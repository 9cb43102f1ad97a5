"""Stopping a replica (rolling update): idle sessions hear 421 4.3.2, a DATA in progress finishes
with its 250 (after the JetStream ack), and nothing is half-accepted."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

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

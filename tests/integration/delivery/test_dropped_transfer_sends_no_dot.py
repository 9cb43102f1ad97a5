"""A transfer given up on sends nothing more, final dot included. `transport.abort()` only drops
asyncio's own buffer: what the kernel's send queue already holds (up to 4 MiB by default, often
all of a message) was still sent after the close. A slow server then got the dot after the
attempt had been deferred, answered 250, and the retry sent the message a second time. The
connection is now reset (SO_LINGER 0), which discards the kernel's queue too."""

from __future__ import annotations

import asyncio
import socket
import time

from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import one_transaction
from tests.support.raw_smtp import ReadsSlowly, serving


class SlowReader(ReadsSlowly):
    """Reads the body 16 KiB every 0.25 s (small receive buffer) and answers 250 after the dot."""

    bite = 16384
    pause = 0.25

    def __init__(self) -> None:
        super().__init__()
        self.dot_at: float | None = None

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._serve, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        if await super().on_data(reader, writer) is None:
            return None
        self.dot_at = time.monotonic()
        return b"250 2.0.0 queued\r\n"  # the message is delivered


async def test_a_deferred_attempt_does_not_deliver_afterwards() -> None:
    body = b"Subject: s\r\n\r\n" + (b"z" * 78 + b"\r\n") * 2_500  # 200 KB: one piece
    async with serving(SlowReader) as start:
        server = await start()
        settings = SessionSettings(port=server.port, command_timeout=1.0, data_done_timeout=1.0)
        result = await one_transaction(settings, body)
        gave_up = time.monotonic()
        await asyncio.sleep(5.0)
    (outcome,) = result.outcomes
    assert outcome.kind == "deferred", outcome  # the job will be sent again
    assert server.dot_at is None, (
        f"the server got the final dot {server.dot_at - gave_up:.1f}s after the attempt was "
        f"deferred ({outcome.reply}) and answered 250: delivered, and the retry delivers it again"
    )

"""A server that refuses the message part-way through its transfer (552 5.3.4 over its size
limit) and then half-closes: its reply is the transaction's outcome (a bounce), not "connection
lost" (a deferral retried until retry.max_age). With the body written in pieces, the next
piece's write used to fail first and hide the reply. (A server that resets the connection
right after its reply can lose it in the kernel before it is read, as before.)"""

from __future__ import annotations

import asyncio
import contextlib

from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import one_transaction
from tests.support.raw_smtp import ScriptedMX, serving

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 32_000  # 32 MB


class RefusesMidBody(ScriptedMX):
    """Reads 300 KiB of the body, answers 552 and ends the connection by `how`."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        await reader.readexactly(300 * 1024)
        writer.write(b"552 5.3.4 Message size exceeds fixed limit\r\n")
        await writer.drain()
        if self.how == "half-close":
            # FIN after the reply; what still comes is read and dropped.
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                while await reader.read(1 << 20):
                    pass
        return None


async def test_a_refusal_mid_body_is_the_outcome() -> None:
    async with serving(RefusesMidBody) as start:
        server = await start("half-close")
        settings = SessionSettings(port=server.port, command_timeout=5.0, data_done_timeout=5.0)
        result = await one_transaction(settings, BIG)
    (outcome,) = result.outcomes
    assert (outcome.kind, outcome.reply.code) == ("bounced", 552), outcome

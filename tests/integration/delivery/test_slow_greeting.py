"""An MX slow to greet: `delivery.connect_timeout` bounds the TCP connection only; the 220
greeting is waited for as long as any other reply (`delivery.command_timeout`).

RFC 5321 4.5.3.2.1 gives the initial 220 five minutes and warns that "many SMTP servers accept a
TCP connection but delay delivery of the 220 message until their system load permits more mail
to be processed"; Postfix waits smtp_helo_timeout (300 s) for it, apart from its 30 s
smtp_connect_timeout. Before, the greeting shared the 30 s connect timeout: mail to such an MX
was deferred attempt after attempt, then bounced as expired, though the MX would have taken it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Delivered
from services.delivery.smtp_session import SessionSettings, Source, TryNextHost, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.test_data_reply_after_partial_rcpt import read_message
from tests.support.raw_smtp import ScriptedMX, serving

BODY = b"Subject: slow greeting\r\n\r\nhello\r\n"


class GreetsLate(ScriptedMX):
    """Accepts the connection at once and greets `delay` seconds later (None: never)."""

    def __init__(self, delay: float | None) -> None:
        super().__init__()
        self.delay = delay
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.delay is None:
            await reader.read()  # until the client gives up
            writer.close()
            return
        await asyncio.sleep(self.delay)
        await super()._serve(reader, writer)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        self.bodies.append(await read_message(reader))
        return b"250 2.0.0 queued\r\n"


@pytest.fixture
async def greets_late() -> AsyncIterator:
    async with serving(GreetsLate) as start:
        yield start


async def test_a_greeting_slower_than_the_connect_timeout_is_waited_for(greets_late) -> None:
    server = await greets_late(2.0)
    settings = SessionSettings(port=server.port, starttls=False, connect_timeout=0.5, command_timeout=10.0)
    conn = await open_connection("127.0.0.1", "mx.b.test", Source("", "relais.test"), settings, TlsPolicy())
    try:
        result = await conn.transact("a@acme.test", ["x@b.test"], BODY)
    finally:
        await conn.close()
    assert [type(o) for o in result.outcomes] == [Delivered], result.outcomes
    assert server.bodies == [BODY]


async def test_a_server_that_never_greets_is_given_up_at_the_command_timeout(greets_late) -> None:
    server = await greets_late(None)
    settings = SessionSettings(port=server.port, starttls=False, connect_timeout=0.2, command_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(TryNextHost) as given_up:
        await open_connection("127.0.0.1", "mx.b.test", Source("", "relais.test"), settings, TlsPolicy())
    waited = time.monotonic() - started
    assert 1.5 <= waited < 5.0, waited
    reply = given_up.value.reply
    assert (reply.code, reply.enhanced_status, reply.command) == (421, "4.4.1", "CONNECT")
    assert "mx.b.test[127.0.0.1]" in reply.text and not given_up.value.remote

"""Some recipients refused at RCPT (for good and for now), the rest accepted, and then the DATA
command or the message refused: the accepted ones take that reply (4xx deferred, 5xx bounced,
421 deferred and the connection not reused), the refused ones keep their own, with and without
PIPELINING; a 250 after the final dot delivers only the accepted ones. A transaction refused at
DATA is left for the pool to RSET before the connection's next message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Bounced, Deferred, Outcome
from services.delivery.smtp_session import Connection, SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import RawServer, serving

BODY = b"Subject: partial\r\n\r\n.a line with a leading dot\r\nhello\r\n"
NO_SUCH_USER = b"550 5.1.1 no such user\r\n"
MAILBOX_BUSY = b"450 4.2.1 mailbox busy\r\n"
RECIPIENTS = ["good@b.test", "bad@b.test", "busy@b.test", "also@b.test"]
GO_AHEAD = b"354 go ahead\r\n"
QUEUED = b"250 2.0.0 queued\r\n"


class RefusesSomeRecipients(RawServer):
    """Refuses bad@ (550) and busy@ (450) and accepts the rest; DATA is played by `on_data`:
    here `data_reply`, and after a 354 the message read to its dot and `dot_reply`. Records
    the commands and the messages it read (dot-unstuffed)."""

    def __init__(self, data_reply: bytes = GO_AHEAD, dot_reply: bytes = QUEUED, *, pipelining: bool) -> None:
        super().__init__()
        self.data_reply = data_reply
        self.dot_reply = dot_reply
        self.pipelining = pipelining
        self.commands: list[str] = []
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx ESMTP\r\n")
        extensions = b"250-mx\r\n" + (b"250-PIPELINING\r\n" if self.pipelining else b"") + b"250 8BITMIME\r\n"
        try:
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
                self.commands.append(verb.decode())
                if verb == b"EHLO":
                    writer.write(extensions)
                elif verb == b"RCPT":
                    refused = {b"<bad@": NO_SUCH_USER, b"<busy@": MAILBOX_BUSY}
                    writer.write(next((r for k, r in refused.items() if k in line), b"250 ok\r\n"))
                elif verb == b"DATA":
                    if not await self.on_data(reader, writer):
                        return
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Play DATA; False ends the session (after a 421)."""
        writer.write(self.data_reply)
        if self.data_reply.startswith(b"354"):
            await writer.drain()
            self.bodies.append(await read_message(reader))
            writer.write(self.dot_reply)
        return not self.data_reply.startswith(b"421")


async def read_message(reader: asyncio.StreamReader) -> bytes:
    """The message up to its final dot, unstuffed."""
    body = b""
    while (data := await reader.readline()) and data != b".\r\n":
        body += data[1:] if data.startswith(b".") else data
    return body


async def connect(server: RawServer, **settings: float) -> Connection:
    return await open_connection(
        "127.0.0.1",
        "mx.b.test",
        Source("", "relais.test"),
        SessionSettings(port=server.port, starttls=False, command_timeout=10.0, **settings),
        TlsPolicy(),
    )


@pytest.fixture
async def refusing() -> AsyncIterator:
    async with serving(RefusesSomeRecipients) as start:
        yield start


def _verdict(outcome: Outcome) -> tuple[str, int, str]:
    return (outcome.kind, outcome.reply.code, outcome.reply.enhanced_status)


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize(
    ("data_reply", "dot_reply", "taken"),
    [
        (b"451 4.3.0 try later\r\n", b"", ("deferred", 451, "4.3.0")),
        (b"554 5.7.1 not from you\r\n", b"", ("bounced", 554, "5.7.1")),
        (b"421 4.3.2 shutting down\r\n", b"", ("deferred", 421, "4.3.2")),
        (GO_AHEAD, QUEUED, ("delivered", 250, "2.0.0")),
        (GO_AHEAD, b"452 4.3.1 out of space\r\n", ("deferred", 452, "4.3.1")),
        (GO_AHEAD, b"554 5.6.0 content refused\r\n", ("bounced", 554, "5.6.0")),
        (GO_AHEAD, b"550-5.7.1 first line\r\n550 5.7.1 second line\r\n", ("bounced", 550, "5.7.1")),
        (GO_AHEAD, b"550 refused, no enhanced code\r\n", ("bounced", 550, "5.0.0")),
        (GO_AHEAD, b"421 4.4.2 closing\r\n", ("deferred", 421, "4.4.2")),
    ],
    ids=[
        "DATA-451",
        "DATA-554",
        "DATA-421",
        "dot-250",
        "dot-452",
        "dot-554",
        "multiline",
        "plain",
        "dot-421",
    ],
)
async def test_accepted_recipients_take_the_data_reply_and_refused_ones_keep_theirs(
    refusing, data_reply: bytes, dot_reply: bytes, taken: tuple[str, int, str], pipelining: bool
) -> None:
    server = await refusing(data_reply, dot_reply, pipelining=pipelining)
    conn = await connect(server)
    closing = taken[1] == 421
    try:
        result = await conn.transact("a@acme.test", RECIPIENTS, BODY)
        assert result.broken == closing, "after a 421 the pool closes the connection"
        if not closing:
            # A transaction not ended by a final reply to the message is RSET before reuse.
            assert conn.needs_probe(time.monotonic()) == (taken[0] != "delivered")
            server.data_reply, server.dot_reply = GO_AHEAD, QUEUED
            again = await conn.transact("a@acme.test", ["next@b.test"], BODY)
            assert [o.kind for o in again.outcomes] == ["delivered"]
    finally:
        await conn.close()
    good, bad, busy, also = result.outcomes
    assert _verdict(good) == _verdict(also) == taken
    assert isinstance(bad, Bounced) and _verdict(bad) == ("bounced", 550, "5.1.1")
    assert isinstance(busy, Deferred) and _verdict(busy) == ("deferred", 450, "4.2.1")
    if data_reply == GO_AHEAD:
        assert server.bodies[0] == BODY, "sent once, dot-stuffed on the wire and unstuffed there"
    else:
        assert server.bodies == ([] if closing else [BODY]), "no message after a refused DATA"

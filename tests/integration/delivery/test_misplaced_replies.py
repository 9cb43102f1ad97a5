"""A 2xx where the protocol has none is never a delivery: a 250 to DATA (no body was sent) and a
server that answers MAIL twice (every later reply shifts onto the wrong command) defer every
recipient with 4.5.0 and close the connection, with and without PIPELINING. Any 2xx to RCPT
takes the recipient, as Postfix reads it (RFC 5321 names 250 and 251; some servers say 252)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Deferred
from services.delivery.smtp_session import Connection, SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import RawServer, serving

BODY = b"Subject: misplaced\r\n\r\nhello\r\n"
PROTOCOL_ERROR = "4.5.0"
DATA_OK_WITHOUT_BODY = b"250 2.0.0 ok\r\n"
RCPT_CANNOT_VERIFY = b"252 2.1.5 cannot verify, will try\r\n"
MAIL_ANSWERED_TWICE = b"250 2.1.0 ok\r\n250 2.1.0 ok\r\n"


class MisbehavingServer(RawServer):
    """Answers each command with `replies[verb]` when scripted, else as a sound server does;
    only a 354 it sent itself makes it read a body. Records the bodies it received."""

    def __init__(self, replies: dict[str, bytes], *, pipelining: bool) -> None:
        super().__init__()
        self.replies = replies
        self.pipelining = pipelining
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 misbehaving ESMTP\r\n")
        extensions = b"250-misbehaving\r\n250-PIPELINING\r\n" if self.pipelining else b"250-misbehaving\r\n"
        try:
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                if verb == "EHLO":
                    writer.write(extensions + b"250 8BITMIME\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    reply = self.replies.get(verb, b"354 go ahead\r\n" if verb == "DATA" else b"250 ok\r\n")
                    writer.write(reply)
                    if reply.startswith(b"354"):
                        await writer.drain()
                        await self._read_body(reader, writer)
                await writer.drain()
        finally:
            writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b""
        while (data := await reader.readline()) and data != b".\r\n":
            body += data
        if data:
            self.bodies.append(body)
            writer.write(b"250 2.0.0 queued\r\n")


@pytest.fixture
async def misbehaving() -> AsyncIterator:
    async with serving(MisbehavingServer) as start:
        yield start


async def _connect(server: MisbehavingServer) -> Connection:
    settings = SessionSettings(port=server.port, starttls=False, command_timeout=5.0)
    return await open_connection("127.0.0.1", "mx.test", Source("", "relais.test"), settings, TlsPolicy())


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize(
    "replies",
    [{"DATA": DATA_OK_WITHOUT_BODY}, {"MAIL": MAIL_ANSWERED_TWICE}],
    ids=["250-to-DATA", "MAIL-answered-twice"],
)
async def test_a_misplaced_2xx_defers_and_closes(
    misbehaving, replies: dict[str, bytes], pipelining: bool
) -> None:
    server = await misbehaving(replies, pipelining=pipelining)
    conn = await _connect(server)
    try:
        result = await conn.transact("a@acme.test", ["x@b.test", "y@b.test"], BODY)
    finally:
        await conn.close()
    for outcome in result.outcomes:
        assert isinstance(outcome, Deferred), outcome
        assert (outcome.reply.code, outcome.reply.enhanced_status) == (451, PROTOCOL_ERROR), outcome
        assert "protocol error" in outcome.reply.text
    assert result.broken and not conn.alive, "a connection out of step is never reused"
    await asyncio.sleep(0.1)  # let the server read whatever was sent before the close
    assert server.bodies == [], "nothing may count as delivered that was never sent"


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("replies", [{}, {"RCPT": RCPT_CANNOT_VERIFY}], ids=["sound", "252-to-RCPT"])
async def test_a_sound_server_still_gets_the_message(
    misbehaving, replies: dict[str, bytes], pipelining: bool
) -> None:
    server = await misbehaving(replies, pipelining=pipelining)
    conn = await _connect(server)
    try:
        result = await conn.transact("a@acme.test", ["x@b.test"], BODY)
    finally:
        await conn.close()
    assert [o.kind for o in result.outcomes] == ["delivered"] and not result.broken
    assert server.bodies == [BODY]


async def test_a_354_after_a_refused_mail_in_a_pipelined_group_closes_the_connection(misbehaving) -> None:
    # Against RFC 2920 the server opened the data phase of a transaction it refused: it now
    # reads whatever comes next as a message, so the connection cannot go back to the pool.
    server = await misbehaving({"MAIL": b"550 5.7.1 sender refused\r\n"}, pipelining=True)
    conn = await _connect(server)
    try:
        result = await conn.transact("a@acme.test", ["x@b.test"], BODY)
    finally:
        await conn.close()
    [outcome] = result.outcomes
    assert outcome.kind == "bounced" and outcome.reply.enhanced_status == "5.7.1", outcome
    assert result.broken and not conn.alive
    await asyncio.sleep(0.1)
    assert server.bodies == []

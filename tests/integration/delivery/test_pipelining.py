"""PIPELINING (RFC 2920): MAIL, every RCPT and DATA go in one write when the MX offers it, and
each reply is paired with its command: several replies in one segment, partial acceptance,
every recipient refused, and a 421 in the middle of the group."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from services.core.outcome import Bounced, Deferred, Delivered
from services.delivery.smtp_session import Connection, SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import RawServer, serving
from tests.support.smtp_sink import SMTPSink

BODY = b"Subject: pipelined\r\n\r\n.leading dot\r\nhello\r\n"
GROUP_OF_TWO = ["MAIL", "RCPT", "RCPT", "DATA"]
NO_SUCH_USER = "550 5.1.1 no such user"
MAILBOX_BUSY = "450 4.2.1 mailbox busy"
CLOSING = "421 4.7.0 too many connections, closing"


async def _connect(sink: SMTPSink) -> Connection:
    settings = SessionSettings(port=sink.port, starttls=False, command_timeout=10.0)
    return await open_connection(sink.host, "mx.alpha.test", Source("", "relais.test"), settings, TlsPolicy())


async def test_a_pipelining_sink_gets_one_group_and_the_message_intact(make_sink) -> None:
    sink = make_sink("127.0.0.2", pipelining=True)
    conn = await _connect(sink)
    try:
        result = await conn.transact("a@acme.test", ["x@alpha.test", "y@alpha.test"], BODY)
        again = await conn.transact("a@acme.test", ["z@alpha.test"], BODY)
    finally:
        await conn.close()
    assert all(isinstance(o, Delivered) for o in result.outcomes + again.outcomes), result
    first, second = sink.messages
    assert first.rcpt_tos == ["x@alpha.test", "y@alpha.test"] and first.data == BODY
    assert second.rcpt_tos == ["z@alpha.test"] and second.data == BODY
    assert sink.mail_reads == [GROUP_OF_TWO, ["MAIL", "RCPT", "DATA"]], "one write per group"
    assert sink.connections == 1


async def test_without_pipelining_each_command_goes_on_its_own(make_sink) -> None:
    sink = make_sink("127.0.0.2")
    conn = await _connect(sink)
    try:
        result = await conn.transact("a@acme.test", ["x@alpha.test", "y@alpha.test"], BODY)
    finally:
        await conn.close()
    assert all(isinstance(o, Delivered) for o in result.outcomes)
    assert sink.mail_reads == [["MAIL"]]


async def test_partial_acceptance_gives_each_recipient_its_own_reply(make_sink) -> None:
    sink = make_sink("127.0.0.2", pipelining=True)
    sink.rcpt_replies = {"bad@alpha.test": NO_SUCH_USER, "later@alpha.test": MAILBOX_BUSY}
    conn = await _connect(sink)
    try:
        rcpts = ["good@alpha.test", "bad@alpha.test", "later@alpha.test", "fine@alpha.test"]
        result = await conn.transact("a@acme.test", rcpts, BODY)
        assert conn.clean and not result.broken
        good, bad, later, fine = result.outcomes
        assert isinstance(good, Delivered) and isinstance(fine, Delivered)
        assert isinstance(bad, Bounced) and bad.reply.enhanced_status == "5.1.1"
        assert isinstance(later, Deferred) and later.reply.enhanced_status == "4.2.1"
        assert [r.code for r in result.remote_replies] == [550, 450]
        assert [m.rcpt_tos for m in sink.messages] == [["good@alpha.test", "fine@alpha.test"]]
    finally:
        await conn.close()


async def test_every_recipient_refused_reads_the_refused_data_and_stays_usable(make_sink) -> None:
    sink = make_sink("127.0.0.2", pipelining=True)
    sink.rcpt_default = NO_SUCH_USER
    conn = await _connect(sink)
    try:
        result = await conn.transact("a@acme.test", ["x@alpha.test", "y@alpha.test"], BODY)
        assert all(isinstance(o, Bounced) for o in result.outcomes) and not result.broken
        # aiosmtpd answers the pipelined DATA "503 Error: need RCPT command": read, not an outcome.
        assert [r.code for r in result.remote_replies] == [550, 550]
        assert sink.data_commands == 0
        assert conn.alive and not conn.clean, "MAIL was accepted: the next message is RSET first"
        assert await conn.reset()
        sink.rcpt_default = None
        again = await conn.transact("a@acme.test", ["z@alpha.test"], BODY)
        assert isinstance(again.outcomes[0], Delivered), "no reply left over to mis-pair"
    finally:
        await conn.close()
    assert [m.rcpt_tos for m in sink.messages] == [["z@alpha.test"]]
    assert sink.connections == 1


async def test_421_at_an_rcpt_defers_the_rest_and_breaks_the_connection(make_sink) -> None:
    sink = make_sink("127.0.0.2", pipelining=True)
    sink.rcpt_replies = {"bad@alpha.test": NO_SUCH_USER, "second@alpha.test": CLOSING}
    conn = await _connect(sink)
    try:
        rcpts = ["first@alpha.test", "bad@alpha.test", "second@alpha.test", "third@alpha.test"]
        result = await conn.transact("a@acme.test", rcpts, BODY)
    finally:
        await conn.close()
    first, bad, second, third = result.outcomes
    assert isinstance(bad, Bounced), "a refusal before the 421 keeps its own outcome"
    for outcome in (first, second, third):
        assert isinstance(outcome, Deferred) and outcome.reply.code == 421, outcome
    assert result.broken and not conn.alive
    assert sink.messages == []


class ScriptedServer(RawServer):
    """Offers PIPELINING and answers a group with scripted writes: `chunks` are written one
    after another (with a pause between), then 250 to the data and to anything after."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        super().__init__()
        self.chunks = chunks

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        try:
            await reader.readline()
            writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 HELP\r\n")
            while (line := await reader.readline()) and not line.startswith(b"DATA"):
                pass
            for i, chunk in enumerate(self.chunks):
                if i:
                    await asyncio.sleep(0.05)
                writer.write(chunk)
                await writer.drain()
            while (data := await reader.readline()) and data != b".\r\n":
                pass
            writer.write(b"250 2.0.0 queued\r\n")
            while line := await reader.readline():
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 2.0.0 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator:
    async with serving(ScriptedServer) as start:
        yield start


REPLIES = (
    b"250 2.1.0 sender ok\r\n250-2.1.5 first line\r\n250 2.1.5 recipient ok\r\n550 5.1.1 no\r\n354 go\r\n"
)


@pytest.mark.parametrize(
    "chunks",
    [
        [REPLIES],  # every reply of the group in one segment
        [REPLIES[:10], REPLIES[10:40], REPLIES[40:]],  # split inside replies, multi-line one too
        [REPLIES[:21], REPLIES[21:]],  # the rest arrives in a later read
    ],
    ids=["one-segment", "split-mid-reply", "after-first"],
)
async def test_several_replies_per_read_are_all_paired(scripted, chunks: list[bytes]) -> None:
    server = await scripted(chunks)
    settings = SessionSettings(port=server.port, starttls=False, command_timeout=5.0)
    conn = await open_connection("127.0.0.1", "mx.test", Source("", "relais.test"), settings, TlsPolicy())
    try:
        result = await conn.transact("a@acme.test", ["x@b.test", "y@b.test"], BODY)
        ok, refused = result.outcomes
        assert isinstance(ok, Delivered) and ok.reply.text.endswith("queued")
        assert isinstance(refused, Bounced) and refused.reply.enhanced_status == "5.1.1"
        noop = await conn.smtp.noop()
        assert (noop.code, noop.message) == (250, "2.0.0 ok"), "no reply left over from the group"
    finally:
        await conn.close()

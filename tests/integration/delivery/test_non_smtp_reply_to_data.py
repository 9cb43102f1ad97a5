"""A reply that is not SMTP at all (no three-digit code) to DATA or after the message's final
dot: a protocol error, as README's rule for replies that fit neither their command nor a
refusal says. Every recipient is deferred with 4.5.0 and the connection closed, never reused
to go on guessing. Before, garbage after the dot deferred with a reply coded -1 and left the
connection in the pool, and garbage to DATA was logged as a local error (4.3.0) with a
traceback, as if Relais had a bug."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Deferred
from tests.integration.delivery.test_data_reply_after_partial_rcpt import (
    GO_AHEAD,
    RefusesSomeRecipients,
    connect,
    read_message,
)
from tests.support.raw_smtp import serving

BODY = b"Subject: garbage\r\n\r\nhello\r\n"
NOT_SMTP = b"HTTP/1.1 400 Bad Request\r\n"
PROTOCOL_ERROR = (451, "4.5.0")


class AnswersGarbage(RefusesSomeRecipients):
    """Answers DATA (`at` "DATA") or the message's final dot (`at` "dot") with an HTTP line."""

    def __init__(self, at: str, *, pipelining: bool) -> None:
        super().__init__(pipelining=pipelining)
        self.at = at

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if self.at == "DATA":
            writer.write(NOT_SMTP)
            return True
        writer.write(GO_AHEAD)
        await writer.drain()
        self.bodies.append(await read_message(reader))
        writer.write(NOT_SMTP)
        return True


@pytest.fixture
async def garbage() -> AsyncIterator:
    async with serving(AnswersGarbage) as start:
        yield start


@pytest.mark.parametrize(
    ("at", "pipelining"),
    [("DATA", False), ("dot", False), ("dot", True)],
    ids=["DATA-lockstep", "dot-lockstep", "dot-pipelined"],
)
async def test_a_non_smtp_reply_to_the_message_is_a_protocol_error(
    garbage, caplog: pytest.LogCaptureFixture, at: str, pipelining: bool
) -> None:
    server = await garbage(at, pipelining=pipelining)
    conn = await connect(server)
    try:
        result = await conn.transact("a@acme.test", ["good@b.test", "also@b.test"], BODY)
    finally:
        await conn.close()
    for outcome in result.outcomes:
        assert isinstance(outcome, Deferred), outcome
        assert (outcome.reply.code, outcome.reply.enhanced_status) == PROTOCOL_ERROR, outcome
    assert result.broken and not conn.alive, "a connection out of step is never reused"
    assert not [r for r in caplog.records if r.exc_info], "a server's garbage is not a local error"

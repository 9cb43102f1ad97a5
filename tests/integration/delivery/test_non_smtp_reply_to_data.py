"""A reply that is no SMTP reply (no three-digit code: an HTTP line, binary noise; or a code
outside 2xx-5xx) to DATA or after the message's final dot: a protocol error, as README's rule
for replies that fit neither their command nor a refusal says. Every recipient is deferred with
4.5.0 and the connection closed, never reused to go on guessing. Before, garbage after the dot
deferred with a reply coded -1 and left the connection in the pool, and garbage to DATA was
logged as a local error (4.3.0) with a traceback, as if Relais had a bug.

After the dot the server may have taken the message whatever it then sent, so the retry may
deliver it twice (RFC 1047), as when the reply never comes: the deferral and the warning say
so in Postfix's words ("message may be sent more than once"; Postfix reads past a line without
a code to the loss or timeout it reports "while sending end of data -- message may be sent
more than once"), and the result is marked for `relais_delivery_possible_duplicates_total`.
Before, garbage after the dot deferred without the note. Garbage to DATA comes before any of
the message went: no note there."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Deferred
from services.delivery import smtp_session
from tests.integration.delivery.test_data_reply_after_partial_rcpt import (
    GO_AHEAD,
    RefusesSomeRecipients,
    connect,
    read_message,
)
from tests.support.raw_smtp import serving

BODY = b"Subject: garbage\r\n\r\nhello\r\n"
NOT_SMTP = b"HTTP/1.1 400 Bad Request\r\n"
NOISE = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\xff\xfe\r\n"
NO_SUCH_CODE = b"600 6.0.0 what\r\n"
GO_AHEAD_AGAIN = GO_AHEAD  # a 3xx after the dot: no reply to a message
PROTOCOL_ERROR = (451, "4.5.0")
MAY_BE_TWICE = "message may be sent more than once"


class AnswersGarbage(RefusesSomeRecipients):
    """Answers DATA (`at` "DATA") or the message's final dot (`at` "dot") with `garbage`."""

    def __init__(self, at: str, garbage: bytes, *, pipelining: bool) -> None:
        super().__init__(pipelining=pipelining)
        self.at = at
        self.garbage = garbage

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if self.at == "DATA":
            writer.write(self.garbage)
            return True
        writer.write(GO_AHEAD)
        await writer.drain()
        self.bodies.append(await read_message(reader))
        writer.write(self.garbage)
        return True


@pytest.fixture
async def garbage() -> AsyncIterator:
    async with serving(AnswersGarbage) as start:
        yield start


@pytest.mark.parametrize(
    ("at", "reply", "pipelining"),
    [
        ("DATA", NOT_SMTP, False),
        ("DATA", NO_SUCH_CODE, False),
        ("dot", NOT_SMTP, False),
        ("dot", NOT_SMTP, True),
        ("dot", NOISE, False),
        ("dot", NO_SUCH_CODE, False),
        ("dot", GO_AHEAD_AGAIN, True),
    ],
    ids=[
        "DATA-lockstep",
        "DATA-code-600",
        "dot-lockstep",
        "dot-pipelined",
        "dot-binary-noise",
        "dot-code-600",
        "dot-code-354",
    ],
)
async def test_a_non_smtp_reply_to_the_message_is_a_protocol_error(
    garbage, caplog: pytest.LogCaptureFixture, at: str, reply: bytes, pipelining: bool
) -> None:
    server = await garbage(at, reply, pipelining=pipelining)
    conn = await connect(server)
    with caplog.at_level(logging.WARNING, logger=smtp_session.__name__):
        try:
            result = await conn.transact("a@acme.test", ["good@b.test", "also@b.test"], BODY)
        finally:
            await conn.close()
    after_dot = at == "dot"
    assert server.bodies == ([BODY] if after_dot else [])
    for outcome in result.outcomes:
        assert isinstance(outcome, Deferred), outcome
        assert (outcome.reply.code, outcome.reply.enhanced_status) == PROTOCOL_ERROR, outcome
        assert (MAY_BE_TWICE in outcome.reply.text) == after_dot, outcome.reply
    warned = [r for r in caplog.records if MAY_BE_TWICE in r.getMessage()]
    assert len(warned) == (1 if after_dot else 0), [r.getMessage() for r in caplog.records]
    assert result.maybe_taken == after_dot, "counted as a possible duplicate after the dot only"
    assert result.broken and not conn.alive, "a connection out of step is never reused"
    assert not [r for r in caplog.records if r.exc_info], "a server's garbage is not a local error"

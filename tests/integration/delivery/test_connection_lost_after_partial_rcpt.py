"""A connection lost (or a reply timed out) after some recipients were refused: each refusal the
server gave stays that recipient's outcome (a 5xx bounces, a 4xx defers with its own reply), and
only the recipients still waiting for the message are deferred with 4.4.2 "connection lost", as
Postfix settles a recipient at its RCPT reply. Before, every recipient was deferred: a 550 turned
into a retry, and a 4xx lost the reply the server gave for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Bounced, Deferred
from tests.integration.delivery.test_data_reply_after_partial_rcpt import (
    RefusesSomeRecipients,
    connect,
    read_message,
)
from tests.support.raw_smtp import ScriptedMX, serving

BODY = b"Subject: partial\r\n\r\nhello\r\n"
CONNECTION_LOST = (451, "4.4.2")
RECIPIENTS = ["good@b.test", "bad@b.test", "busy@b.test"]


class GoesAwayAfterRcpts(RefusesSomeRecipients):
    """Refuses bad@ for good and busy@ for now; then, `when`:
    "DATA"    closes at the DATA command, without a reply;
    "body"    answers 354, reads the first line of the message and closes;
    "dot"     reads the message to its final dot and closes without a reply;
    "silent"  reads the message to its final dot and never answers."""

    def __init__(self, when: str, *, pipelining: bool) -> None:
        super().__init__(pipelining=pipelining)
        self.when = when
        self.got_dot = False

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if self.when == "DATA":
            await writer.drain()  # the replies before it go out; then the connection closes
            return False
        writer.write(b"354 go ahead\r\n")
        await writer.drain()
        if self.when == "body":
            await reader.readline()
            return False
        self.bodies.append(await read_message(reader))
        self.got_dot = True
        if self.when == "silent":
            await reader.read()  # until the client gives up and closes
        return False


@pytest.fixture
async def going_away() -> AsyncIterator:
    async with serving(GoesAwayAfterRcpts) as start:
        yield start


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("when", ["DATA", "body", "dot", "silent"])
async def test_refused_recipients_keep_their_outcome_when_the_connection_goes(
    going_away, when: str, pipelining: bool
) -> None:
    server = await going_away(when, pipelining=pipelining)
    conn = await connect(server, data_done_timeout=1.0)
    try:
        result = await conn.transact("a@acme.test", RECIPIENTS, BODY)
    finally:
        await conn.close()
    good, bad, busy = result.outcomes
    assert isinstance(good, Deferred), good
    assert (good.reply.code, good.reply.enhanced_status) == CONNECTION_LOST, good
    assert good.reply.command == "DATA", "lost while the message was being sent or answered"
    assert isinstance(bad, Bounced), "a 550 at RCPT is final whatever happens later"
    assert (bad.reply.code, bad.reply.enhanced_status) == (550, "5.1.1"), bad
    assert isinstance(busy, Deferred), busy
    assert (busy.reply.code, busy.reply.enhanced_status) == (450, "4.2.1"), "the server's own reply"
    assert result.broken and not conn.alive
    assert [r.code for r in result.remote_replies] == [550, 450]
    assert server.got_dot == (when in ("dot", "silent"))


class GoesAwayAt(ScriptedMX):
    """Closes without a reply when the command `verb` comes (the first one, for RCPT)."""

    def __init__(self, verb: bytes, *, pipelining: bool) -> None:
        super().__init__()
        self.verb = verb
        self.extensions = (b"PIPELINING", b"8BITMIME") if pipelining else (b"8BITMIME",)

    def reply_to(self, verb: bytes) -> bytes | None:
        return None if verb == self.verb else super().reply_to(verb)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        raise AssertionError("the connection goes before DATA")


@pytest.fixture
async def going_away_at() -> AsyncIterator:
    async with serving(GoesAwayAt) as start:
        yield start


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("verb", ["MAIL", "RCPT"])
async def test_the_deferral_names_the_command_the_connection_was_lost_at(
    going_away_at, verb: str, pipelining: bool
) -> None:
    server = await going_away_at(verb.encode(), pipelining=pipelining)
    conn = await connect(server)
    try:
        result = await conn.transact("a@acme.test", ["good@b.test"], BODY)
    finally:
        await conn.close()
    [outcome] = result.outcomes
    assert isinstance(outcome, Deferred), outcome
    assert (outcome.reply.code, outcome.reply.enhanced_status) == CONNECTION_LOST, outcome
    assert outcome.reply.command == verb, outcome.reply

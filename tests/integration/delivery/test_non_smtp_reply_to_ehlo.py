"""A reply to EHLO (or HELO) that is not SMTP at all: a protocol error deferred 451 4.5.0 and the
next host tried, as for such a reply later in the session. Before, it was read as a refusal of
EHLO: HELO was tried on a server out of step, and the job deferred with a reply coded -1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.delivery.smtp_session import TryNextHost
from tests.integration.delivery.test_data_reply_after_partial_rcpt import connect
from tests.support.raw_smtp import ScriptedMX, serving

NOT_SMTP = b"HTTP/1.1 400 Bad Request\r\n"


class AnswersHelloWithGarbage(ScriptedMX):
    """Answers EHLO with `ehlo` and HELO with an HTTP line; records the commands it got."""

    def __init__(self, *, ehlo: bytes) -> None:
        super().__init__()
        self.ehlo = ehlo
        self.commands: list[bytes] = []

    def ehlo_reply(self, tls: bool) -> bytes:
        self.commands.append(b"EHLO")
        return self.ehlo

    def reply_to(self, verb: bytes) -> bytes | None:
        self.commands.append(verb)
        return NOT_SMTP if verb == b"HELO" else super().reply_to(verb)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        raise AssertionError("no transaction may start")


@pytest.fixture
async def garbled() -> AsyncIterator:
    async with serving(AnswersHelloWithGarbage) as start:
        yield start


async def test_a_non_smtp_reply_to_ehlo_is_a_protocol_error(garbled) -> None:
    server = await garbled(ehlo=NOT_SMTP)
    with pytest.raises(TryNextHost) as caught:
        await connect(server)
    reply = caught.value.reply
    assert (reply.code, reply.enhanced_status, reply.command) == (451, "4.5.0", "EHLO"), reply
    assert caught.value.remote
    assert server.commands[:1] == [b"EHLO"] and b"HELO" not in server.commands, "no guessing on"


async def test_a_non_smtp_reply_to_helo_after_ehlo_was_refused_is_a_protocol_error(garbled) -> None:
    server = await garbled(ehlo=b"502 5.5.1 no EHLO here\r\n")
    with pytest.raises(TryNextHost) as caught:
        await connect(server)
    reply = caught.value.reply
    assert (reply.code, reply.enhanced_status, reply.command) == (451, "4.5.0", "HELO"), reply
    assert server.commands[:2] == [b"EHLO", b"HELO"]

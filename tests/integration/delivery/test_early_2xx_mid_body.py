"""A 2xx that comes while the message is still being sent (before its final dot) fits nothing:
no message was, so nothing is delivered. Only a 250 there was taken as such; a 251 or 252
delivered a message the server never received whole."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.core.outcome import Deferred
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import one_transaction
from tests.support.raw_smtp import ScriptedMX, serving

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8_000  # 8 MB: sent in many pieces


class AnswersMidBody(ScriptedMX):
    """Reads 300 KiB of the message, answers `reply`, then reads on until the dot (250) or
    until the client goes; `got_dot` says whether the whole message came."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply
        self.got_dot = False

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        await reader.readexactly(300 * 1024)
        writer.write(self.reply)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                if line == b".\r\n":
                    self.got_dot = True
                    return b"250 2.0.0 queued\r\n"
        return None


@pytest.mark.parametrize("reply", [b"250 2.0.0 ok\r\n", b"251 2.1.5 ok\r\n", b"252 2.1.5 ok\r\n"])
async def test_a_2xx_before_the_end_of_the_message_delivers_nothing(reply: bytes) -> None:
    async with serving(AnswersMidBody) as start:
        server = await start(reply)
        settings = SessionSettings(port=server.port, command_timeout=5.0, data_done_timeout=5.0)
        result = await one_transaction(settings, BIG)
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred), outcome
    assert not server.got_dot, "the transfer stops at the reply: the rest is not sent"

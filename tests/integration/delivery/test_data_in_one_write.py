"""A message the transport takes at once goes to the server in one write, final dot included:
the body and its dot used to be two writes, two sends to the kernel, with nothing between them
that could change the outcome. A message too large for that still gets its dot in a write of
its own, after the body has drained, so that a transfer given up on never sends it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator

import pytest
from aiosmtplib.protocol import SMTPProtocol

from services.delivery.message_data import message_data
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import one_transaction
from tests.support.certs import TestPKI
from tests.support.raw_smtp import ScriptedMX, serving


class KeepsMessage(ScriptedMX):
    """Reads the message up to its final dot, keeps it as it arrived, and answers 250."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context)
        self.received = b""

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        while not self.received.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(1 << 16)
            if not chunk:
                return None
            self.received += chunk
        return b"250 2.0.0 queued\r\n"


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every write delivery's SMTP connections make, as handed to the transport."""
    seen: list[bytes] = []
    write = SMTPProtocol.write

    def recording(self: SMTPProtocol, data: bytes) -> None:
        seen.append(bytes(data))
        write(self, data)

    monkeypatch.setattr(SMTPProtocol, "write", recording)
    yield seen


SMALL = b"Subject: s\r\n\r\n.a leading dot\r\n" + b"line of text\r\n" * 100


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
async def test_a_small_message_goes_in_one_write_with_its_dot(
    writes: list[bytes], pki: TestPKI, tls: bool
) -> None:
    async with serving(KeepsMessage) as start:
        server = await start(pki.server_context() if tls else None)
        result = await one_transaction(SessionSettings(port=server.port, command_timeout=5.0), SMALL)
    (outcome,) = result.outcomes
    assert outcome.kind == "delivered", outcome
    wire = message_data(SMALL).wire
    assert server.received == wire, "the server got the message byte for byte, dot-stuffed"
    data_writes = [w for w in writes if w.endswith(b".\r\n")]
    assert data_writes == [wire], f"body and dot in one write, not {[len(w) for w in data_writes]}"


async def test_a_large_message_gets_its_dot_in_a_write_of_its_own(writes: list[bytes]) -> None:
    large = b"Subject: l\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2_000  # 160 KB: over the high-water mark
    async with serving(KeepsMessage) as start:
        server = await start()
        result = await one_transaction(SessionSettings(port=server.port, command_timeout=5.0), large)
    (outcome,) = result.outcomes
    assert outcome.kind == "delivered", outcome
    wire = message_data(large).wire
    assert server.received == wire
    data_writes = [w for w in writes if w.endswith(b".\r\n")]
    assert data_writes == [b".\r\n"], "the dot in a write of its own"
    dot = writes.index(b".\r\n")
    assert writes[dot - 1] == wire[:-3], "after the whole body"

"""The body written in 256 KiB pieces reaches the server byte for byte as one write did, dots
at the piece boundaries included (the pieces are slices of the dot-stuffed wire), over
plaintext and STARTTLS."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from services.delivery.message_data import _CHUNK, message_data
from services.delivery.smtp_session import SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.certs import TestPKI
from tests.support.raw_smtp import ScriptedMX, serving

SOURCE = Source("", "relais.test")


def _body() -> bytes:
    """Lines so that a line starting with "." straddles and starts at several piece boundaries."""
    out = bytearray(b"Subject: dots\r\n\r\n")
    n = 0
    while len(out) < 3 * _CHUNK + 1000:
        n += 1
        out += b"." * (n % 3) + b"line %d\r\n" % n
        # Land a line start exactly on the next boundary (in stuffed-wire terms, roughly).
        rest = _CHUNK - (len(out) % _CHUNK)
        if 0 < rest < 40:
            out += b"x" * max(0, rest - 2) + b"\r\n" + b".\r\n" + b"..x\r\n"
    return bytes(out)


class Recorder(ScriptedMX):
    """Keeps the message as it came over the wire, final dot included."""

    extensions = (b"PIPELINING",)

    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__(context)
        self.data = b""

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        got = bytearray()
        while not got.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(1 << 16)
            if not chunk:
                return None
            got += chunk
        self.data = bytes(got)
        return b"250 ok\r\n"


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
async def test_pieces_reach_the_server_byte_for_byte(pki: TestPKI, tls: bool) -> None:
    body = _body()
    wire = message_data(body).wire
    async with serving(Recorder) as start:
        server = await start(pki.server_context() if tls else None)
        settings = SessionSettings(port=server.port, command_timeout=10.0, data_done_timeout=10.0)
        conn = await open_connection("127.0.0.1", "mx.test", SOURCE, settings, TlsPolicy())
        assert bool(conn.tls_version) == tls
        try:
            result = await conn.transact("a@acme.test", ["x@b.test"], body)
        finally:
            await conn.close()
    assert [o.kind for o in result.outcomes] == ["delivered"], result.outcomes
    assert server.data == wire, (len(server.data), len(wire))

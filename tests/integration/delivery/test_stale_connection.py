"""A connection reused without RSET that the server closed meanwhile: the message goes over a
fresh connection, not to a retry, also behind more dead ones than a message replaces one by one
(`sending._STALE_RETRIES`: the last try opens a new one); and a connection left with an open
transaction is RSET."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import dns.asyncresolver
import pytest

from services.core.outcome import Delivered
from services.delivery import smtp_session
from services.delivery.connections import ConnectionPool
from services.delivery.sending import _STALE_RETRIES
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import attempt
from tests.support.raw_smtp import RawServer, serving


class OneShotServer(RawServer):
    """Takes one message per connection; the next MAIL on it gets 421 and a close (or a plain
    close, `drop=True`), as a server does that dropped a session the client still holds.
    Records every command, so tests can see whether RSET was sent."""

    def __init__(self, *, drop: bool = False) -> None:
        super().__init__()
        self.drop = drop
        self.commands: list[str] = []
        self.connections = 0
        self.delivered = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        done = False
        writer.write(b"220 one-shot ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                self.commands.append(verb)
                if verb == "MAIL" and done:
                    if not self.drop:
                        writer.write(b"421 4.4.2 closing idle session\r\n")
                        await writer.drain()
                    break
                if verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    while (data := await reader.readline()) and data != b".\r\n":
                        pass
                    done = True
                    self.delivered += 1
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb == "RCPT" and b"<refused" in line:
                    writer.write(b"550 5.1.1 no such user\r\n")
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def make_server() -> AsyncIterator:
    async with serving(OneShotServer) as start:
        yield start


async def _send(pool: ConnectionPool, rcpt: str) -> list:
    result = await attempt(pool, dns.asyncresolver.Resolver(configure=False), ["127.0.0.1"], rcpt, "one-shot")
    return result.outcomes


@pytest.mark.parametrize("drop", [False, True], ids=["421", "closed"])
async def test_a_dead_reused_connection_is_replaced_not_deferred(make_server, drop: bool) -> None:
    server = await make_server(drop=drop)
    pool = ConnectionPool(None, SessionSettings(port=server.port, starttls=False))  # type: ignore[arg-type]
    try:
        for i in range(3):
            (outcome,) = await _send(pool, f"r{i}@b.test")
            assert isinstance(outcome, Delivered), outcome
    finally:
        await pool.close()
    assert server.delivered == 3 and server.connections == 3
    assert "RSET" not in server.commands, "a clean, recently used connection is reused without RSET"


async def test_an_open_transaction_is_reset_before_reuse(make_server) -> None:
    server = await make_server()
    pool = ConnectionPool(None, SessionSettings(port=server.port, starttls=False))  # type: ignore[arg-type]
    try:
        (refused,) = await _send(pool, "refused@b.test")  # MAIL accepted, RCPT refused: no DATA
        assert not isinstance(refused, Delivered)
        (outcome,) = await _send(pool, "r@b.test")
        assert isinstance(outcome, Delivered)
    finally:
        await pool.close()
    assert server.commands[:6] == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT"]
    assert server.connections == 1


@pytest.mark.parametrize("drop", [False, True], ids=["421", "closed"])
async def test_a_message_behind_more_dead_connections_than_retries_still_goes(
    make_server, monkeypatch: pytest.MonkeyPatch, drop: bool
) -> None:
    # However slow the machine, the idle connections count as recently used: none is probed.
    monkeypatch.setattr(smtp_session, "REUSE_WITHOUT_PROBE", 3600.0)
    server = await make_server(drop=drop)
    pool = ConnectionPool(None, SessionSettings(port=server.port, starttls=False))  # type: ignore[arg-type]
    idle = _STALE_RETRIES + 1
    try:
        # Sent side by side, each over a connection of its own, all left idle afterwards.
        first = await asyncio.gather(*(_send(pool, f"r{i}@b.test") for i in range(idle)))
        assert all(isinstance(o, Delivered) for (o,) in first), first
        assert server.connections == idle
        (outcome,) = await _send(pool, "last@b.test")
        assert isinstance(outcome, Delivered), outcome
    finally:
        await pool.close()
    assert server.delivered == idle + 1 and server.connections == idle + 1

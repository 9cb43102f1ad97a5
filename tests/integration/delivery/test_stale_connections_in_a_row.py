"""More reused connections found dead at MAIL than a message replaces one by one
(`sending._STALE_RETRIES`): the last try goes over a new connection, so the message is
delivered, not deferred (which would count an attempt for nothing the MX said about it)."""

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
from tests.integration.delivery.test_stale_connection import OneShotServer
from tests.support.raw_smtp import serving


@pytest.fixture
async def make_server() -> AsyncIterator:
    async with serving(OneShotServer) as start:
        yield start


async def _send(pool: ConnectionPool, rcpt: str) -> list:
    result = await attempt(pool, dns.asyncresolver.Resolver(configure=False), ["127.0.0.1"], rcpt, "one-shot")
    return result.outcomes


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

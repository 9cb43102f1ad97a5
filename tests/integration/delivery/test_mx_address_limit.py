"""One attempt tries at most MX_ADDRESS_LIMIT addresses over all MX hosts (Postfix's
smtp_mx_address_limit): a domain listing many dead addresses cannot hold a delivery slot for
each one's timeout. The attempt is deferred with the last reply it got."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.core.embedded import free_port
from services.core.outcome import Deferred
from services.delivery.connections import ConnectionPool
from services.delivery.sending import MX_ADDRESS_LIMIT
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import attempt, resolver_of
from tests.support.dns_server import DNSServer

FIRST_MX = [f"127.0.0.{i}" for i in range(31, 35)]  # 4 addresses
SECOND_MX = [f"127.0.0.{i}" for i in range(35, 38)]  # 3 more: 7 in all
BUSY = b"421 4.3.2 busy, try later\r\n"


class BusyMXs:
    """Every address greets with 421 and hangs up; counts the connections each one took."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self.port = free_port(*hosts)
        self.connections: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        for host in self.hosts:
            self._servers.append(await asyncio.start_server(self._greet(host), host, self.port))

    def _greet(self, host: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections[host] += 1
            writer.write(BUSY)
            await writer.drain()
            writer.close()

        return greet

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def busy() -> AsyncIterator[BusyMXs]:
    mxs = BusyMXs(FIRST_MX + SECOND_MX)
    await mxs.start()
    yield mxs
    await mxs.stop()


async def test_an_attempt_stops_after_five_addresses(dns_server: DNSServer, busy: BusyMXs) -> None:
    dns_server.add("mx1.many.test", "A", *FIRST_MX)
    dns_server.add("mx2.many.test", "A", *SECOND_MX)
    pool = ConnectionPool(None, SessionSettings(port=busy.port, starttls=False, connect_timeout=5.0))  # type: ignore[arg-type]
    try:
        mx_hosts = ["mx1.many.test", "mx2.many.test"]
        result = await attempt(pool, resolver_of(dns_server), mx_hosts, "r@many.test", "many.test")
    finally:
        await pool.close()
    assert MX_ADDRESS_LIMIT == 5
    assert sum(busy.connections.values()) == MX_ADDRESS_LIMIT, busy.connections
    assert all(busy.connections[h] == 1 for h in FIRST_MX), "the first MX's addresses come first"
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.code == 421, outcome
    assert outcome.reply.enhanced_status == "4.3.2", "deferred with the last reply"

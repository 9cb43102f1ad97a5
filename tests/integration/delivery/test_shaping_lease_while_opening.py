"""A connection still being opened keeps its share of the site's connection cap, however long
the MX takes to greet: a tarpit greeting must not let another worker open a second connection
to a site capped at one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ensure_topology
from services.delivery.connections import ConnectionPool, Saturated
from services.delivery.limits import LEASE_TTL, SharedLimits
from services.delivery.shaping import Limits
from services.delivery.smtp_session import Connection, SessionSettings, Source
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import ScriptedMX, serving

SITE = "tarpit.test"
CAPPED = Limits(connections=1)


class HoldsTheGreeting(ScriptedMX):
    """Greets only once `greet` is set (a tarpit MX), counting the connections it accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.greet = asyncio.Event()
        self.accepted = 0

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        return b"250 ok\r\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await self.greet.wait()
        await super()._serve(reader, writer)


async def until_true(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def test_a_connection_slow_to_greet_keeps_its_lease(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    buses = [await connect(config.nats, f"test-opening-{i}") for i in range(2)]
    pools: list[ConnectionPool] = []
    tasks: list[asyncio.Task[Connection]] = []

    def checkout(pool: ConnectionPool) -> asyncio.Task[Connection]:
        source = Source("", "relais.test")
        task = asyncio.create_task(
            pool.checkout(source, SITE, "mx.tarpit.test", "127.0.0.1", CAPPED, TlsPolicy())
        )
        tasks.append(task)
        return task

    try:
        await ensure_topology(buses[0].js, config)
        async with serving(HoldsTheGreeting) as start:
            mx = await start()
            settings = SessionSettings(port=mx.port, command_timeout=120.0, starttls=False)
            pools = [
                ConnectionPool(SharedLimits(bus.js, owner=f"worker-{i}"), settings, lease_wait=1.0)
                for i, bus in enumerate(buses)
            ]
            for pool in pools:
                pool.start()
            try:
                first = checkout(pools[0])
                await until_true(lambda: mx.accepted == 1, "the first worker connected")
                # The greeting is still held back after the lease would have run out unrenewed.
                await asyncio.sleep(LEASE_TTL + 2.0)
                assert not first.done()

                second = checkout(pools[1])
                await until_true(lambda: second.done() or mx.accepted > 1, "the second worker's verdict")
                assert mx.accepted == 1, "a second connection to a site capped at one"
                assert isinstance(second.exception(), Saturated)
            finally:
                mx.greet.set()
            conn = await asyncio.wait_for(first, 60)
            await pools[0].checkin(conn, CAPPED, reusable=False)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in pools:
            await pool.close()
        for bus in buses:
            await bus.close()

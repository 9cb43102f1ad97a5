"""Idle connections to an MX that stopped answering must not hold back the renewal of the
worker's leases: each one waits for its QUIT, and one after another they outlast LEASE_TTL,
so the leases of every other site lapse and another worker opens connections past their cap."""

from __future__ import annotations

import asyncio

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ensure_topology
from services.delivery.connections import ConnectionPool, Saturated
from services.delivery.limits import LEASE_TTL, SharedLimits
from services.delivery.shaping import Limits
from services.delivery.smtp_session import Connection, SessionSettings, Source
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import RawServer, serving

CAPPED = Limits(connections=1)
UNCAPPED = Limits(connections=0)
HUNG = 5  # idle connections whose QUIT is never answered (about 5 s each)
SOURCE = Source("", "relais.test")


class Answers(RawServer):
    """An MX on (host, port) that answers 250 to everything (220 first), counting the
    connections it accepted; with `hang_on_quit` QUIT gets no reply and the connection stays
    open, as a peer gone silent."""

    def __init__(self, host: str, port: int, *, hang_on_quit: bool = False) -> None:
        super().__init__(host, port)
        self.hang_on_quit = hang_on_quit
        self.accepted = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.write(b"220 mx ESMTP\r\n")
        try:
            while line := await reader.readline():
                if line.upper().startswith(b"QUIT"):
                    if self.hang_on_quit:
                        continue
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                writer.write(b"250 ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_hung_idle_connections_do_not_let_other_leases_lapse(
    nats_server: EmbeddedNats, sink_port: int
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    buses = [await connect(config.nats, f"test-hung-{i}") for i in range(2)]
    pools: list[ConnectionPool] = []
    try:
        await ensure_topology(buses[0].js, config)
        async with serving(Answers) as start:
            capped = await start("127.0.0.2", sink_port)
            silent = await start("127.0.0.3", sink_port, hang_on_quit=True)
            settings = SessionSettings(port=sink_port, starttls=False)
            pools = [
                ConnectionPool(SharedLimits(bus.js, owner=f"w{i}"), settings, idle_timeout=1, lease_wait=1)
                for i, bus in enumerate(buses)
            ]
            worker, other = pools
            for pool in pools:
                pool.start()

            async def checkout(pool: ConnectionPool, site: str, address: str, limits: Limits) -> Connection:
                return await pool.checkout(SOURCE, site, f"mx.{site}", address, limits, TlsPolicy())

            # The worker holds the capped site's only connection, busy for the whole test...
            busy = await checkout(worker, "capped.test", "127.0.0.2", CAPPED)
            # ...and has idle connections to another MX, which has since gone silent.
            hung = [await checkout(worker, "silent.test", "127.0.0.3", UNCAPPED) for _ in range(HUNG)]
            for conn in hung:
                await worker.checkin(conn, UNCAPPED, reusable=True)

            # Past the lease's lifetime: renewed in time, it still holds the cap for the worker.
            await asyncio.sleep(LEASE_TTL + 3.0)
            try:
                second = await checkout(other, "capped.test", "127.0.0.2", CAPPED)
                await other.checkin(second, CAPPED, reusable=False)
            except Saturated:
                pass
            assert capped.accepted == 1, "a second connection to a site capped at one"
            assert silent.accepted == HUNG
            await worker.checkin(busy, CAPPED, reusable=False)
    finally:
        for pool in pools:
            await pool.close()
        for bus in buses:
            await bus.close()

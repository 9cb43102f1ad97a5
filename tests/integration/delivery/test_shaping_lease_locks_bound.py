"""The pool's per-(source, site) lease bookkeeping lasts only while it is used.

Every connection opened to a capped site (all of them by default: `connections = 10`) passes
through a lock per (source, site) and a lock per lease key, and a site found at its cap leaves
the time of that miss. A worker meets a new (source, site) for every source it picks and every
destination its mail goes to: kept for ever, these grew by some 500 octets per pair for the
worker's lifetime, about half a gigabyte per million pairs.
"""

from __future__ import annotations

import asyncio

import pytest

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ensure_topology
from services.delivery.connections import ConnectionPool, Saturated
from services.delivery.limits import SharedLimits
from services.delivery.shaping import Limits
from services.delivery.smtp_session import SessionSettings, Source
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.test_shaping_lease_release_race import Sink
from tests.support.raw_smtp import serving

SOURCE = Source("", "relais.test")
CAPPED = Limits(connections=1)
SITES = [f"site{i}.test" for i in range(20)]
MX = ("mx.test", "127.0.0.1")


async def test_lease_locks_and_misses_are_dropped_once_unused(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-lease-locks")
    pool: ConnectionPool | None = None
    try:
        await ensure_topology(bus.js, config)
        async with serving(Sink) as start:
            mx = await start()
            settings = SessionSettings(port=mx.port, connect_timeout=10.0, starttls=False)
            pool = ConnectionPool(SharedLimits(bus.js), settings, idle_timeout=0.4, lease_wait=0.3)
            pool.start()
            for site in SITES:
                conn = await pool.checkout(SOURCE, site, *MX, CAPPED, TlsPolicy())
                if site in SITES[:3]:
                    # At the cap of one: a second connection misses, waits, and gives up.
                    with pytest.raises(Saturated):
                        await pool.checkout(SOURCE, site, *MX, CAPPED, TlsPolicy(), fresh=True)
                await pool.checkin(conn, CAPPED, reusable=False)
            await asyncio.sleep(1.0)  # a few housekeeping rounds
            held = (len(pool._lease_locks), len(pool._lease_writes), len(pool._lease_miss))
            assert held == (0, 0, 0), f"(source, site) locks, lease-key locks, misses kept: {held}"
    finally:
        if pool is not None:
            await pool.close()
        await bus.close()

"""A connection closed while another one of the same worker opens keeps the cap's count right.

The lease of a closing connection is released by a KV compare-and-set, and a new connection's
grant states how many leases the worker holds. A grant that counted without the closing lease,
written before that release landed, had the release take one off a count that no longer held
it: the record showed one connection fewer than were open, and another worker opened one past
the site's cap, for as long as the worker kept its connections busy.
"""

from __future__ import annotations

import asyncio

import msgpack

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import SHAPING_BUCKET, ensure_topology
from services.delivery.connections import ConnectionPool
from services.delivery.limits import Lease, SharedLimits, lease_key
from services.delivery.shaping import Limits
from services.delivery.smtp_session import SessionSettings, Source
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import ScriptedMX, serving

SITE = "capped.test"
CAPPED = Limits(connections=2)
SOURCE = Source("", "relais.test")


class Sink(ScriptedMX):
    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        return b"250 ok\r\n"


class HeldRelease(SharedLimits):
    """Leases whose release reaches KV only once `go` is set: a slow round trip, made long."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.releasing = asyncio.Event()
        self.go = asyncio.Event()

    async def release(self, lease: Lease) -> None:
        self.releasing.set()
        await self.go.wait()
        await super().release(lease)


async def test_a_grant_during_a_release_leaves_the_cap_counted(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    buses = [await connect(config.nats, f"test-release-race-{i}") for i in range(2)]
    pool: ConnectionPool | None = None
    tasks: list[asyncio.Task[object]] = []
    try:
        await ensure_topology(buses[0].js, config)
        async with serving(Sink) as start:
            mx = await start()
            settings = SessionSettings(port=mx.port, connect_timeout=10.0, starttls=False)
            limits = HeldRelease(buses[0].js, owner="worker-a")
            pool = ConnectionPool(limits, settings, lease_wait=5.0)

            def checkout() -> asyncio.Task[object]:
                assert pool is not None
                task = asyncio.create_task(
                    pool.checkout(SOURCE, SITE, "mx.capped.test", "127.0.0.1", CAPPED, TlsPolicy())
                )
                tasks.append(task)
                return task

            first, second = await checkout(), await checkout()
            # The first connection is done with; its lease's release is on its way to KV.
            closing = asyncio.create_task(pool.checkin(first, CAPPED, reusable=False))
            tasks.append(closing)
            await asyncio.wait_for(limits.releasing.wait(), 10)
            # Meanwhile a job of the same worker needs a connection to the site.
            third = checkout()
            # Time enough for it to be granted and opened before the release lands, as it was.
            await asyncio.sleep(1.0)
            limits.go.set()
            await asyncio.wait_for(closing, 10)
            third_conn = await asyncio.wait_for(third, 10)

            # Worker A has two connections open: the cap of 2 is full for everyone else.
            kv = await buses[0].js.key_value(SHAPING_BUCKET)
            record = msgpack.unpackb((await kv.get(lease_key("", SITE))).value)
            other = SharedLimits(buses[1].js, owner="worker-b")
            granted = await other.acquire_lease("", SITE, CAPPED.connections)
            assert record["worker-a"][0] == 2, f"two connections open, the record says {record}"
            assert granted is None, "a third connection to a site capped at two"
            await pool.checkin(second, CAPPED, reusable=False)
            await pool.checkin(third_conn, CAPPED, reusable=False)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pool is not None:
            await pool.close()
        for bus in buses:
            await bus.close()

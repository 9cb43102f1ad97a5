"""Connection leases in KV: a crashed worker's share frees up, a renewal states what is held."""

from __future__ import annotations

import time

import msgpack

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import SHAPING_BUCKET, ensure_topology
from services.delivery.limits import LEASE_TTL, SharedLimits, lease_key

SOURCE, SITE = "192.0.2.1", "capped.test"


async def test_a_crashed_workers_cap_frees_up_and_a_renewal_restates_what_is_held(
    nats_server: EmbeddedNats,
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-leases")
    try:
        await ensure_topology(bus.js, config)
        kv = await bus.js.key_value(SHAPING_BUCKET)
        key = lease_key(SOURCE, SITE)
        # A worker that died holding the whole cap of 2, its last renewal just over LEASE_TTL ago.
        await kv.put(key, msgpack.packb({"dead": [2, time.time() - 1.0, 0.0]}))

        worker = SharedLimits(bus.js, owner="alive")
        assert await worker.acquire_lease(SOURCE, SITE, 2) is not None
        assert await worker.acquire_lease(SOURCE, SITE, 2) is not None
        assert await worker.acquire_lease(SOURCE, SITE, 2) is None, "never above the cap"
        record = msgpack.unpackb((await kv.get(key)).value)
        assert "dead" not in record and record["alive"][0] == 2

        # NATS was away past our renewal and another worker's grant dropped our entry; the two
        # connections are still open, so the renewal puts them back rather than extending nothing.
        await kv.put(key, msgpack.packb({"other": [1, time.time() + LEASE_TTL, 0.0]}))
        await worker.renew(key, 2)
        record = msgpack.unpackb((await kv.get(key)).value)
        assert record["alive"][0] == 2
        assert record["alive"][1] > time.time() + LEASE_TTL - 5
        assert record["other"][0] == 1

        # A live entry keeps its own count (grants and releases maintain it); only its time moves.
        await worker.renew(key, 5)
        record = msgpack.unpackb((await kv.get(key)).value)
        assert record["alive"][0] == 2
    finally:
        await bus.close()

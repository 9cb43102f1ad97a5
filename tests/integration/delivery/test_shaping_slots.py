"""Rate slots reserved in blocks: unique and one interval apart across workers, fewer writes."""

from __future__ import annotations

import asyncio
import itertools

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import SHAPING_BUCKET, ensure_topology
from services.delivery.limits import SharedLimits, slot_key

INTERVAL = 0.02  # 3,000 a minute: blocks of up to 1 s / 0.02 s, capped at MAX_BLOCK


async def test_two_workers_never_share_a_slot(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    buses = [await connect(config.nats, f"test-slots-{i}") for i in range(2)]
    try:
        await ensure_topology(buses[0].js, config)
        workers = [SharedLimits(bus.js) for bus in buses]

        async def job(limits: SharedLimits) -> float:
            return await limits.reserve("msg", "192.0.2.1", "fast.test", INTERVAL)

        slots = await asyncio.gather(*(job(w) for w in workers for _ in range(60)))

        ordered = sorted(slots)
        gaps = [b - a for a, b in itertools.pairwise(ordered)]
        assert min(gaps) >= INTERVAL - 1e-6, "every slot is its own, one interval from the next"
        kv = await buses[0].js.key_value(SHAPING_BUCKET)
        entry = await kv.get(slot_key("msg", "192.0.2.1", "fast.test"))
        assert entry.revision < len(slots) / 2, "one write per block, not one per message"
    finally:
        for bus in buses:
            await bus.close()


async def test_a_lone_job_takes_one_slot_and_the_next_waits_its_turn(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-slots")
    try:
        await ensure_topology(bus.js, config)
        limits = SharedLimits(bus.js)
        first = await limits.reserve("msg", "192.0.2.1", "slow.test", 5.0)
        second = await limits.reserve("msg", "192.0.2.1", "slow.test", 5.0)
        assert second - first >= 5.0 - 1e-6
    finally:
        await bus.close()

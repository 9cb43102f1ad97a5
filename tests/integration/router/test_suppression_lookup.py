"""The router's suppression lookup: all of a message's recipients in one batched direct get."""

from __future__ import annotations

import json
import time

from nats.js.api import KeyValueConfig

from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.suppression import Suppression, SuppressionList, suppression_key
from services.core.topology import SUPPRESSION_BUCKET, ensure_topology


async def test_many_recipients_are_looked_up_together(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-suppression")
    try:
        await ensure_topology(bus.js, config)
        plain, batched = SuppressionList(bus.js), SuppressionList(bus.js, bus)
        await plain.add(Suppression("acme", "Hard@Example.test", "hard_bounce"))
        await plain.add(Suppression("acme", "gone@example.test", "manual"))
        await plain.remove("acme", "gone@example.test")
        await plain.add(Suppression("acme", "old@example.test", "manual", expires_at=time.time() - 1))
        await plain.add(Suppression("other", "clean@example.test", "complaint"))
        many = [f"r{i}@example.test" for i in range(600)]  # more than one request's worth
        for address in many[::150]:
            await plain.add(Suppression("acme", address, "manual"))
        asked = ["hard@example.test", "gone@example.test", "old@example.test", "clean@example.test", *many]

        found = await batched.get_many("acme", asked)

        assert sorted(found) == sorted(["hard@example.test", *many[::150]])
        assert found["hard@example.test"].reason == "hard_bounce"
        one_by_one = {a: await plain.get("acme", a) for a in asked}
        assert {a for a, e in one_by_one.items() if e is not None} == set(found)
        assert await batched.get_many("acme", ["nobody@example.test", "none@example.test"]) == {}
        assert await batched.get_many("acme", ["HARD@example.test"]) == {
            "hard@example.test": found["hard@example.test"]
        }
    finally:
        await bus.close()


async def test_a_bucket_without_direct_gets_is_read_one_key_at_a_time(nats_server: EmbeddedNats) -> None:
    # As an earlier release created it, before ensure_topology switched direct gets on.
    bus = await connect(NatsConfig(url=nats_server.url), "test-suppression-old")
    try:
        await bus.js.create_key_value(KeyValueConfig(bucket=SUPPRESSION_BUCKET, history=1))
        plain = SuppressionList(bus.js)
        await plain.add(Suppression("acme", "a@example.test", "manual"))
        found = await SuppressionList(bus.js, bus).get_many("acme", ["a@example.test", "b@example.test"])
        assert list(found) == ["a@example.test"]
    finally:
        await bus.close()


async def test_a_bounce_never_shortens_an_entry_that_lasts_longer(topology_bus: Bus) -> None:
    suppression = SuppressionList(topology_bus.js)
    soon = time.time() + 60
    await suppression.add(Suppression("acme", "forever@example.test", "manual", source="ops"))
    await suppression.add(
        Suppression("acme", "forever@example.test", "complaint", expires_at=soon), keep_longer=True
    )
    kept = await suppression.get("acme", "forever@example.test")
    assert kept is not None and (kept.reason, kept.expires_at) == ("manual", 0.0)

    await suppression.add(Suppression("acme", "brief@example.test", "manual", expires_at=soon))
    await suppression.add(Suppression("acme", "brief@example.test", "hard_bounce"), keep_longer=True)
    longer = await suppression.get("acme", "brief@example.test")
    assert longer is not None and (longer.reason, longer.expires_at) == ("hard_bounce", 0.0)

    await suppression.add(Suppression("acme", "new@example.test", "complaint"), keep_longer=True)
    assert await suppression.get("acme", "new@example.test") is not None
    await suppression.remove("acme", "new@example.test")  # a delete marker is no entry
    await suppression.add(Suppression("acme", "new@example.test", "complaint"), keep_longer=True)
    assert await suppression.get("acme", "new@example.test") is not None
    # An operator's own entry replaces any.
    await suppression.add(Suppression("acme", "forever@example.test", "manual", expires_at=soon))
    replaced = await suppression.get("acme", "forever@example.test")
    assert replaced is not None and replaced.expires_at == soon


async def test_listing_reads_newer_records_and_skips_unreadable_ones(topology_bus: Bus) -> None:
    suppression = SuppressionList(topology_bus.js)
    await suppression.add(Suppression("acme", "a@example.test", "manual", at=1.0))
    kv = await topology_bus.js.key_value(SUPPRESSION_BUCKET)
    newer = {"account": "acme", "address": "b@example.test", "reason": "manual", "at": 2.0, "later": 1}
    await kv.put(suppression_key("acme", "b@example.test"), json.dumps(newer).encode())
    await kv.put(suppression_key("acme", "c@example.test"), b"not json")
    listed = await suppression.list("acme")
    assert [e.address for e in listed] == ["a@example.test", "b@example.test"]

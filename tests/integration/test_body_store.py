"""Stored bodies read with direct gets: the same bytes as the Object Store's own read."""

from __future__ import annotations

import os

import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ensure_topology


@pytest.mark.parametrize("size", [1, 128 * 1024, 3 * 1024 * 1024 + 5])
async def test_a_stored_body_reads_back_byte_for_byte(nats_server: EmbeddedNats, size: int) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-bodies")
    try:
        await ensure_topology(bus.js, config)
        writer = BodyStore(bus.js, inline_max=0)
        data = os.urandom(size)
        await writer.put("other", os.urandom(200_000))  # chunks of another body in between
        ref = await writer.put("m1", data)
        assert ref.inline is None

        direct, plain = BodyStore(bus.js, 0, bus), BodyStore(bus.js, 0)
        assert await direct.get(ref) == data
        assert await plain.get(ref) == data

        await writer.discard(ref)
        with pytest.raises(BodyMissing):
            await direct.get(ref)
    finally:
        await bus.close()


async def test_a_replica_behind_the_write_does_not_make_a_body_look_gone(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a replicated stream any replica answers a direct get, and one that has not applied the
    # ingress's write yet finds nothing. Only the leader may say that a body is gone: a body
    # taken for gone drops its message as "already finished", without an outcome.
    bus = topology_bus
    store = BodyStore(bus.js, 0, bus)
    data = os.urandom(200_000)
    ref = await store.put("m1", data)

    async def behind(stream: str, subjects: list[str]) -> dict[str, object]:
        return {}  # what a lagging follower answers

    monkeypatch.setattr(bus, "get_last", behind)
    assert await store.get(ref) == data

    async def stale(self: KeyValue, key: str, revision: int | None = None) -> object:
        raise KeyNotFoundError  # a lagging replica's view of the reference record

    monkeypatch.setattr(KeyValue, "get", stale)
    await store.hold(ref, ["m1-0", "m1-1"])
    await store.release(ref, "m1-0")
    assert await store.get(ref) == data, "m1-1 still needs it"
    await store.release(ref, "m1-1")
    with pytest.raises(BodyMissing):
        await store.get(ref)


async def test_a_second_holder_keeps_the_body_until_both_released(topology_bus: Bus) -> None:
    store = BodyStore(topology_bus.js, 0, topology_bus)
    ref = await store.put("m2", os.urandom(200_000))
    await store.hold(ref, ["m2-a"])
    await store.add_holder(ref, "m2-a#bn1", beside="m2-a")
    await store.add_holder(ref, "m2-a#bn1", beside="m2-a")  # settle asked again: no second entry

    await store.release(ref, "m2-a")
    assert len(await store.get(ref)) == 200_000, "the DSN's holder still needs it"
    await store.release(ref, "m2-a#bn1")
    with pytest.raises(BodyMissing):
        await store.get(ref)

    # A job that already finished: nothing is held again, and nothing is left to leak.
    await store.add_holder(ref, "m2-a#dw", beside="m2-a")
    with pytest.raises(BodyMissing):
        await store.get(ref)

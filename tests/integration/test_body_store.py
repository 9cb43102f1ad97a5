"""Stored bodies read with direct gets: the same bytes as the Object Store's own read; deleted
bodies purged, by the service or by the topology keeper's sweep."""

from __future__ import annotations

import os

import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.core.bodies import BodyMissing, BodyStore, sweep_deleted_bodies
from services.core.bus import BrokerUnavailable, Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import BODY_BUCKET, ensure_topology, object_stream


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


async def _subjects(bus: Bus) -> dict[str, int]:
    """Messages per subject in the bodies' stream: every chunk and meta still stored."""
    info = await bus.js.stream_info(object_stream(BODY_BUCKET), subjects_filter=">")
    return dict(info.state.subjects or {})


async def test_a_deleted_body_leaves_nothing_in_the_store(topology_bus: Bus) -> None:
    # Where the service's user may purge (it declares the topology), it purges at once.
    store = BodyStore(topology_bus.js, 0, topology_bus)
    kept = await store.put("kept", os.urandom(300_000))
    before = await _subjects(topology_bus)
    gone = await store.put("gone", os.urandom(300_000))

    await store.discard(gone)

    assert await _subjects(topology_bus) == before
    with pytest.raises(BodyMissing):
        await store.get(gone)
    assert len(await store.get(kept)) == 300_000


async def test_a_user_that_may_not_purge_leaves_a_deleted_body_to_the_sweep(topology_bus: Bus) -> None:
    """As on Kubernetes, where no service user may purge the bodies' stream: the body is gone
    for every reader at once, and its chunks stay until the topology keeper's sweep."""
    bus = topology_bus
    store = BodyStore(bus.js, 0, bus, purges=False)
    kept = await store.put("kept", os.urandom(300_000))
    before = await _subjects(bus)
    gone = await store.put("gone", os.urandom(300_000))
    await store.discard(gone)
    with pytest.raises(BodyMissing):
        await store.get(gone)
    chunks = [s for s, n in (await _subjects(bus)).items() if s not in before and ".C." in s]
    assert chunks, "the chunks wait for the sweep"

    swept_to = await sweep_deleted_bodies(bus)

    assert await _subjects(bus) == before
    assert len(await store.get(kept)) == 300_000
    # The next sweep starts where this one stopped and finds what was deleted since.
    later = await store.put("later", os.urandom(200_000))
    await store.discard(later)
    assert await sweep_deleted_bodies(bus, after=swept_to) > swept_to
    assert await _subjects(bus) == before


async def test_a_body_whose_meta_was_not_stored_is_deleted_with_its_chunks(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingress answers 451; the chunks already stored are named in a deleted meta, which
    the sweep purges."""
    bus = topology_bus
    store = BodyStore(bus.js, 0, bus, purges=False)
    before = await _subjects(bus)
    publish = bus.js.publish
    refused: list[str] = []

    async def meta_refused(subject: str, payload: bytes = b"", **kwargs: object) -> object:
        if ".M." in subject and not refused:
            refused.append(subject)
            raise TimeoutError("no ack")
        return await publish(subject, payload, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bus.js, "publish", meta_refused)
    with pytest.raises(BrokerUnavailable):
        await store.put("refused", os.urandom(300_000))
    assert refused

    await sweep_deleted_bodies(bus)
    assert await _subjects(bus) == before

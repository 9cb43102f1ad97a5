"""The msg id lookup a redelivered job makes (`redelivery.msg_id_stored`), against a real
nats-server alone and a 3-node cluster with replicated streams (where the server checks the
message before proposing it): it finds what was stored under the id, and stores nothing itself,
so the outcome it looked for can still be published under that id afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig
from services.core.topology import EVENTS_STREAM, ensure_topology, event_subject
from services.delivery.redelivery import msg_id_stored
from tests.support.cluster import NatsCluster
from tests.support.nats import start_nats

SUBJECT = event_subject("acme", "delivered")


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def nats_config(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsConfig]:
    base: Path = tmp_path_factory.mktemp(request.param)
    if request.param == "standalone":
        server = start_nats(base)
        try:
            yield NatsConfig(url=server.url)
        finally:
            server.stop()
        return
    cluster = NatsCluster(base, size=3)
    try:
        cluster.start()
        yield NatsConfig(url=cluster.url, replicas=3)
    finally:
        cluster.stop()


@pytest.fixture
async def bus(nats_config: NatsConfig) -> AsyncIterator[Bus]:
    config = Config(nats=nats_config)
    bus = await connect(config.nats, "test-redelivery-lookup")
    try:
        await ensure_topology(bus.js, config)
        yield bus
    finally:
        await bus.close()


async def events_stored(bus: Bus) -> int:
    return (await bus.js.stream_info(EVENTS_STREAM)).state.messages


async def test_a_stored_msg_id_is_found(bus: Bus) -> None:
    await bus.publish(SUBJECT, b"{}", msg_id="dlv-found-1")
    before = await events_stored(bus)
    assert await msg_id_stored(bus, SUBJECT, "dlv-found-1")
    assert await events_stored(bus) == before


async def test_looking_up_a_msg_id_not_stored_leaves_it_free(bus: Bus) -> None:
    before = await events_stored(bus)
    assert not await msg_id_stored(bus, SUBJECT, "dlv-free-1")
    assert not await msg_id_stored(bus, SUBJECT, "dlv-free-1"), "the first look stored nothing"
    assert await events_stored(bus) == before
    ack = await bus.publish(SUBJECT, b"{}", msg_id="dlv-free-1")
    assert not ack.duplicate, "the outcome is still stored when it comes"
    assert await events_stored(bus) == before + 1
    assert await msg_id_stored(bus, SUBJECT, "dlv-free-1")


async def test_a_stream_that_takes_roll_ups_loses_nothing_to_a_lookup(
    bus: Bus, nats_config: NatsConfig
) -> None:
    # Relais' streams take no roll-ups; were one configured to, the lookup must neither store
    # nor roll the subject up (which would purge it).
    await bus.js.add_stream(
        StreamConfig(
            name="ROLLUPS", subjects=["rollups.>"], allow_rollup_hdrs=True, num_replicas=nats_config.replicas
        )
    )
    await bus.publish("rollups.a", b"kept", msg_id="kept-1")
    assert not await msg_id_stored(bus, "rollups.a", "missing-1")
    assert await msg_id_stored(bus, "rollups.a", "kept-1")
    assert (await bus.js.stream_info("ROLLUPS")).state.messages == 1
    assert not (await bus.publish("rollups.a", b"new", msg_id="missing-1")).duplicate

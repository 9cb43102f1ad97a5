"""An envelope a later release wrote (a newer schema) during a rolling upgrade is left for an
upgraded replica, not terminated: accepted mail must not disappear on an older router."""

from __future__ import annotations

import asyncio

import msgpack

from services.core.embedded import EmbeddedNats
from services.core.envelope import SCHEMA_VERSION
from services.core.topology import ROUTE_STREAM, ROUTER_CONSUMER, route_subject
from tests.support.relais import RelaisStack, an_envelope, make_config


def _later_release_envelope() -> bytes:
    wire = msgpack.unpackb(an_envelope("a@alpha.test", body=b"hi\r\n", received_at=1700000000.0).to_msgpack())
    wire["v"] = SCHEMA_VERSION + 1
    return msgpack.packb(wire)


async def test_an_envelope_of_a_later_release_waits_for_it(nats_server: EmbeddedNats) -> None:
    stack = RelaisStack(make_config(nats_url=nats_server.url))
    await stack.start(["router"])
    try:
        bus = stack._buses[0]
        await bus.publish(route_subject(), _later_release_envelope())
        info = None
        for _ in range(50):
            info = await bus.js.consumer_info(ROUTE_STREAM, ROUTER_CONSUMER)
            if info.delivered.consumer_seq >= 1:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # time for a terminate to have removed it
        state = (await bus.js.stream_info(ROUTE_STREAM)).state
        assert info is not None and info.delivered.consumer_seq >= 1, "the router never saw it"
        assert state.messages == 1, "terminated: accepted mail lost during an upgrade"
    finally:
        await stack.stop()

"""Creating a missing consumer again leaves no pull subscription behind: the old one is
unsubscribed before a new one is bound."""

from __future__ import annotations

import asyncio

from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from services.core.bus import connect, consume
from services.core.config import NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ConsumerBinding


async def test_recreating_a_consumer_leaves_no_subscription_behind(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-consume")
    try:
        await bus.js.add_stream(
            StreamConfig(name="GONE", subjects=["gone.>"], retention=RetentionPolicy.WORK_QUEUE)
        )
        declared = ConsumerConfig(durable_name="gone", ack_policy=AckPolicy.EXPLICIT, ack_wait=2.0)
        await bus.js.add_consumer("GONE", declared)
        binding = ConsumerBinding("GONE", "gone", "gone.>")
        handled: asyncio.Queue[str] = asyncio.Queue()

        async def handler(msg) -> None:  # type: ignore[no-untyped-def]
            await handled.put(msg.subject)

        stop = asyncio.Event()
        task = asyncio.create_task(
            consume(bus, binding, handler, concurrency=4, stop=stop, ack_wait=2.0, declared=declared)
        )
        try:
            await bus.publish("gone.0", b"x")
            assert await asyncio.wait_for(handled.get(), 10) == "gone.0"
            before = len(bus.nc._subs)
            for i in range(1, 4):
                await bus.js.delete_consumer("GONE", "gone")
                await bus.publish(f"gone.{i}", b"x")
                assert await asyncio.wait_for(handled.get(), 30) == f"gone.{i}"
            after = len(bus.nc._subs)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert after == before, f"{after - before} subscriptions left behind by 3 re-creations"
    finally:
        await bus.nc.close()

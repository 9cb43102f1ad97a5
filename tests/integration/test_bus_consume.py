"""bus.consume against a real nats-server: a handler slower than ack_wait is not redelivered."""

from __future__ import annotations

import asyncio

from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from services.core.bus import connect, consume
from services.core.config import NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ConsumerBinding

ACK_WAIT = 2.0


async def test_slow_handler_is_kept_in_progress_and_runs_once(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-consume")
    try:
        await bus.js.add_stream(StreamConfig(name="SLOW", subjects=["slow.>"]))
        await bus.js.add_consumer(
            "SLOW",
            ConsumerConfig(
                durable_name="slow", ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT, max_deliver=-1
            ),
        )
        for i in range(3):
            await bus.publish(f"slow.{i}", b"x")
        calls: list[str] = []

        async def handler(msg) -> None:  # type: ignore[no-untyped-def]
            calls.append(msg.subject)
            await asyncio.sleep(3 * ACK_WAIT)  # far past ack_wait: only "in progress" saves it

        stop = asyncio.Event()
        task = asyncio.create_task(
            consume(
                bus,
                ConsumerBinding("SLOW", "slow", "slow.>"),
                handler,
                concurrency=8,
                stop=stop,
                ack_wait=ACK_WAIT,
            )
        )
        await asyncio.sleep(3 * ACK_WAIT + 2.0)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert sorted(calls) == ["slow.0", "slow.1", "slow.2"], calls
        info = await bus.js.consumer_info("SLOW", "slow")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0, info
    finally:
        await bus.nc.close()

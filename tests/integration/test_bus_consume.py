"""bus.consume against a real nats-server: a handler slower than ack_wait is not redelivered; a
consumer deleted while consumed is created again, leaving no pull subscription behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from services.core.bus import Bus, connect, consume
from services.core.config import NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ConsumerBinding

ACK_WAIT = 2.0


async def work_queue(bus: Bus, stream: str, name: str, *, ack_wait: float) -> ConsumerBinding:
    """A stream of `name.>` and a durable pull consumer `name` on it, acked explicitly."""
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[f"{name}.>"]))
    config = ConsumerConfig(
        durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=-1
    )
    await bus.js.add_consumer(stream, config)
    return ConsumerBinding(stream, name, f"{name}.>")


async def test_slow_handler_is_kept_in_progress_and_runs_once(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-consume")
    try:
        binding = await work_queue(bus, "SLOW", "slow", ack_wait=ACK_WAIT)
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
                binding,
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


async def test_after_an_outage_a_consumer_takes_no_more_than_its_concurrency(
    nats_server: EmbeddedNats,
) -> None:
    # Pull requests made while disconnected used to be buffered and replayed on reconnect; the
    # server then pushed batch x seconds-of-outage messages, all run at once, and those that
    # waited past ack_wait were redelivered and handled twice.
    bus = await connect(NatsConfig(url=nats_server.url), "test-consume")
    try:
        binding = await work_queue(bus, "OUT", "out", ack_wait=ACK_WAIT)
        calls: list[str] = []
        running = peak = 0

        async def handler(msg) -> None:  # type: ignore[no-untyped-def]
            nonlocal running, peak
            calls.append(msg.subject)
            running += 1
            peak = max(peak, running)
            try:
                await asyncio.sleep(1.2 * ACK_WAIT)
            finally:
                running -= 1

        stop = asyncio.Event()
        task = asyncio.create_task(
            consume(
                bus,
                binding,
                handler,
                concurrency=4,
                batch=4,
                stop=stop,
                ack_wait=ACK_WAIT,
            )
        )
        await asyncio.sleep(1.0)
        nats_server.stop()
        await asyncio.sleep(6.0)  # the loop idles on a dead connection
        nats_server.start()
        for _ in range(100):
            if bus.nc.is_connected:
                break
            await asyncio.sleep(0.2)
        for i in range(16):
            await bus.publish(f"out.{i}", b"x")
        for _ in range(150):
            if len(set(calls)) == 16 and running == 0:
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 20)
        assert sorted(set(calls)) == sorted(f"out.{i}" for i in range(16))
        assert peak <= 4, f"{peak} handlers at once with a concurrency of 4"
        assert len(calls) == 16, f"handled twice: {sorted(c for c in calls if calls.count(c) > 1)}"
    finally:
        await bus.nc.close()


async def test_progress_follows_the_consumers_ack_wait_on_the_server(nats_server: EmbeddedNats) -> None:
    # The last replica to declare the consumer sets its ack_wait; during a rollout that lowers
    # it, a replica pacing "in progress" by its own longer one lost its messages to others.
    bus = await connect(NatsConfig(url=nats_server.url), "test-consume")
    try:
        binding = await work_queue(bus, "PACE", "pace", ack_wait=3.0)
        await bus.publish("pace.0", b"x")
        calls: list[str] = []

        async def handler(msg) -> None:  # type: ignore[no-untyped-def]
            calls.append(msg.subject)
            await asyncio.sleep(8.0)

        stop = asyncio.Event()
        loops = [
            asyncio.create_task(
                consume(
                    bus,
                    binding,
                    handler,
                    concurrency=4,
                    stop=stop,
                    ack_wait=30.0,  # this replica's configuration: the previous, longer one
                )
            )
            for _ in range(2)
        ]
        await asyncio.sleep(10.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), 20)
        assert calls == ["pace.0"], calls
    finally:
        await bus.nc.close()


@contextlib.asynccontextmanager
async def consuming_gone(nats_server: EmbeddedNats) -> AsyncIterator[tuple[Bus, asyncio.Queue[str]]]:
    """A bus consuming stream GONE through its declared consumer `gone` for the block: yields the
    bus and the subjects handled, in turn. Work-queue retention, as Relais' streams: a re-created
    consumer starts at the first message still stored, so what was acked is not handled again."""
    bus = await connect(NatsConfig(url=nats_server.url), "test-consume")
    try:
        await bus.js.add_stream(
            StreamConfig(name="GONE", subjects=["gone.>"], retention=RetentionPolicy.WORK_QUEUE)
        )
        declared = ConsumerConfig(durable_name="gone", ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT)
        await bus.js.add_consumer("GONE", declared)
        binding = ConsumerBinding("GONE", "gone", "gone.>")
        handled: asyncio.Queue[str] = asyncio.Queue()

        async def handler(msg) -> None:  # type: ignore[no-untyped-def]
            await handled.put(msg.subject)

        stop = asyncio.Event()
        task = asyncio.create_task(
            consume(bus, binding, handler, concurrency=4, stop=stop, ack_wait=ACK_WAIT, declared=declared)
        )
        try:
            yield bus, handled
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    finally:
        await bus.nc.close()


async def delete_once_acked(bus: Bus) -> None:
    """Delete consumer `gone` once the acks sent are processed (the work queue has removed what
    was handled): an ack still on its way would make the new consumer deliver it again, rightly."""
    for _ in range(200):
        if (await bus.js.stream_info("GONE")).state.messages == 0:
            break
        await asyncio.sleep(0.05)
    await bus.js.delete_consumer("GONE", "gone")


async def test_a_consumer_deleted_while_consuming_is_created_again(nats_server: EmbeddedNats) -> None:
    # Deleted by hand (or lost in a restore): the loop used to pull from nothing until a restart.
    async with consuming_gone(nats_server) as (bus, handled):
        await bus.publish("gone.1", b"x")
        assert await asyncio.wait_for(handled.get(), 10) == "gone.1"
        await delete_once_acked(bus)
        await bus.publish("gone.2", b"x")
        assert await asyncio.wait_for(handled.get(), 30) == "gone.2"
        info = await bus.js.consumer_info("GONE", "gone")
        assert info.config.ack_wait == ACK_WAIT, "created again as declared"


async def test_recreating_a_consumer_leaves_no_subscription_behind(nats_server: EmbeddedNats) -> None:
    # The old pull subscription is unsubscribed before a new one is bound.
    async with consuming_gone(nats_server) as (bus, handled):
        await bus.publish("gone.0", b"x")
        assert await asyncio.wait_for(handled.get(), 10) == "gone.0"
        before = len(bus.nc._subs)
        for i in range(1, 4):
            await delete_once_acked(bus)
            await bus.publish(f"gone.{i}", b"x")
            assert await asyncio.wait_for(handled.get(), 30) == f"gone.{i}"
        after = len(bus.nc._subs)
    assert after == before, f"{after - before} subscriptions left behind by 3 re-creations"

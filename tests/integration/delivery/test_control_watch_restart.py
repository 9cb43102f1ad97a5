"""A delivery worker whose watch of the `relais-delivery-control` bucket was interrupted reads the
bucket anew: a pause resumed meanwhile leaves its copy, a pause set meanwhile is in it, and a
pause still in force is never missing from it, not even for a moment of the rebuild.

nats-py resumes an interrupted watch on its own, from the stream sequence after the last one it
saw. What went meanwhile without a message left behind is never told that way: the marker of a
resume once its TTL ran out (JetStream then removes it, as the subject purge here does), or
everything of a bucket declared anew, whose sequences start again at 1. Earlier releases kept
such a pause in the worker's copy, holding the site's mail until the worker restarted, and
missed a pause set in a bucket declared anew: mail went to a paused site. On a real nats-server,
with the worker's link to it cut by a proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from nats.js import JetStreamContext

from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.pause import pause_key
from services.core.topology import DELIVERY_CONTROL_BUCKET, ensure_topology, kv_stream, kv_subject
from services.delivery import pause
from services.delivery.control import DeliveryControl
from tests.support.nats_cut_proxy import CuttableNatsProxy

STREAM = kv_stream(DELIVERY_CONTROL_BUCKET)
WAIT = 40.0  # nats-py takes up to 10 s to resume a watch itself; a loaded machine more


@asynccontextmanager
async def worker_behind(proxy: CuttableNatsProxy) -> AsyncIterator[tuple[Bus, DeliveryControl]]:
    """A delivery worker's control, connected to NATS through `proxy`, started (its copy read)."""
    bus = await connect(NatsConfig(url=proxy.url), "test-delivery")
    control, stop = DeliveryControl(bus.js), asyncio.Event()
    try:
        await control.start(stop)
        yield bus, control
    finally:
        stop.set()
        await control.stop()
        await bus.close()


@asynccontextmanager
async def never_unpaused(control: DeliveryControl, site: str) -> AsyncIterator[None]:
    """Fails the test if `site` is ever not paused in `control`'s copy while inside."""
    gaps: list[float] = []

    async def sample() -> None:
        while True:
            if not control.paused("site", site):
                gaps.append(time.monotonic())
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        yield
    finally:
        sampler.cancel()
    assert not gaps, f"{site} was forgotten {len(gaps)} times while still paused: its mail went out"


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def resume_without_trace(js: JetStreamContext, site: str) -> None:
    """Resume `site`'s pause, then remove the resume's marker as JetStream does when its TTL ends."""
    assert await pause.resume(js, "site", site)
    await js.purge_stream(STREAM, subject=kv_subject(DELIVERY_CONTROL_BUCKET, pause_key("site", site)))


async def test_a_pause_resumed_while_a_worker_was_cut_off_leaves_its_copy(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    js = topology_bus.js
    await pause.pause(js, "site", "kept.test", reason="still in force")
    await pause.pause(js, "site", "resumed.test", reason="resumed while the worker is away")
    async with CuttableNatsProxy(nats_server.url) as proxy, worker_behind(proxy) as (bus, worker):
        assert worker.paused("site", "resumed.test") and worker.paused("site", "kept.test")
        async with never_unpaused(worker, "kept.test"):
            proxy.cut()
            await until(lambda: not bus.nc.is_connected, "the worker did not notice the cut")
            await resume_without_trace(js, "resumed.test")
            await pause.pause(js, "site", "new.test", reason="paused while the worker is away")
            proxy.mend()

            await until(lambda: worker.paused("site", "new.test"), "the pause set meanwhile was missed")
            await until(
                lambda: not worker.paused("site", "resumed.test"),
                "the pause resumed meanwhile stays in the worker's copy: its site's mail waits for ever",
            )
        assert worker.held_keys() == {pause_key("site", "kept.test"), pause_key("site", "new.test")}


async def test_a_pause_resumed_while_the_worker_s_watch_consumer_was_gone_leaves_its_copy(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    js = topology_bus.js
    await pause.pause(js, "site", "kept.test", reason="still in force")
    await pause.pause(js, "site", "resumed.test", reason="resumed while the watch is away")
    async with CuttableNatsProxy(nats_server.url) as proxy, worker_behind(proxy) as (_, worker):
        async with never_unpaused(worker, "kept.test"):
            # The worker's ordered consumer lost, as a server restart or a new stream leader loses
            # it: nobody else watches the bucket here.
            consumers = await js.consumers_info(STREAM)
            assert consumers, "the worker's watch has a consumer"
            for consumer in consumers:
                await js.delete_consumer(STREAM, consumer.name)
            await resume_without_trace(js, "resumed.test")

            await until(
                lambda: not worker.paused("site", "resumed.test"),
                "the pause resumed meanwhile stays in the worker's copy: its site's mail waits for ever",
            )
        assert worker.held_keys() == {pause_key("site", "kept.test")}


async def test_a_pause_set_in_a_bucket_declared_anew_is_not_missed(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    js = topology_bus.js
    for site in ("a.test", "b.test", "c.test"):
        await pause.pause(js, "site", site, reason="before the bucket was lost")
    async with CuttableNatsProxy(nats_server.url) as proxy, worker_behind(proxy) as (_, worker):
        assert worker.held_keys() == {pause_key("site", s) for s in ("a.test", "b.test", "c.test")}
        # The bucket lost and declared again (an operator's `nats kv rm`, a store lost): its
        # sequences start again at 1, below what the worker's watch had seen.
        await js.delete_stream(STREAM)
        await ensure_topology(js, Config(nats=NatsConfig(url=nats_server.url)))
        await pause.pause(js, "site", "new.test", reason="paused in the new bucket")

        await until(
            lambda: worker.paused("site", "new.test"),
            "a pause in the bucket declared anew was missed: the worker sends to a paused site",
        )
        await until(
            lambda: worker.held_keys() == {pause_key("site", "new.test")},
            "pauses gone with the old bucket stay in the worker's copy",
        )

"""Back-offs an earlier release stored without a TTL (the long tail it left in the bucket, or one
written during a rolling upgrade): once one has ended, the workers purge it, by compare-and-set on
the revision they saw, so a push-back written meanwhile is never removed. One still running stays,
and so do pauses. On a real nats-server."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from services.core.bus import Bus, leader_last
from services.core.outcome import Reply
from services.core.topology import DELIVERY_CONTROL_BUCKET, kv_stream, kv_subject
from services.delivery import pause
from services.delivery.control import LEFT_BEHIND, Backoff, DeliveryControl, backoff_key, purge_ended
from services.delivery.shaping import Pushback
from tests.integration.delivery.conftest import running_controls

SOURCE = "127.0.0.21"
HOUR = Pushback("provider-hour", re.compile("try in an hour"), duration=3600.0, messages_per_minute=10)
SWEEP_EVERY = 0.2
WAIT = 30.0


def reply(text: str) -> Reply:
    return Reply(421, "4.7.0", text, "DATA")


async def store_as_earlier_release(js: JetStreamContext, site: str, until: float) -> int:
    """A back-off written as the previous release wrote them: a plain value, no TTL."""
    kv = await js.key_value(DELIVERY_CONTROL_BUCKET)
    return await kv.put(
        backoff_key(SOURCE, site), Backoff(until, 10.0, "old-rule", "421 slow down").to_bytes()
    )


async def record(js: JetStreamContext, site: str) -> RawStreamMsg | None:
    key = backoff_key(SOURCE, site)
    return await leader_last(js, kv_stream(DELIVERY_CONTROL_BUCKET), kv_subject(DELIVERY_CONTROL_BUCKET, key))


def holds_no_value(msg: RawStreamMsg | None) -> bool:
    """Nothing stored for the key, or only the marker of its removal, which expires in turn."""
    return msg is None or (not msg.data and "Nats-TTL" in (msg.headers or {}))


@pytest.fixture
async def stop() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


async def test_an_ended_back_off_without_ttl_is_purged_and_forgotten(
    topology_bus: Bus, stop: asyncio.Event
) -> None:
    js = topology_bus.js
    now = time.time()
    await store_as_earlier_release(js, "ended.test", now - 2 * LEFT_BEHIND)
    await store_as_earlier_release(js, "runs.test", now + 3600)
    await pause.pause(js, "site", "paused.test", reason="test")
    control = DeliveryControl(js)
    await control.start(stop, sweep_every=SWEEP_EVERY)
    try:
        deadline = time.monotonic() + WAIT
        while not holds_no_value(await record(js, "ended.test")):
            assert time.monotonic() < deadline, "the ended back-off is still stored"
            await asyncio.sleep(0.1)
        while backoff_key(SOURCE, "ended.test") in control.held_keys():
            assert time.monotonic() < deadline, "the worker still holds the ended back-off"
            await asyncio.sleep(0.1)

        running = await record(js, "runs.test")
        assert running is not None and running.data, "a running back-off stays"
        assert control.backoff(SOURCE, "runs.test") == Backoff.from_bytes(running.data)
        assert await pause.is_paused(js, "site", "paused.test") and control.paused("site", "paused.test")
    finally:
        await control.stop()


async def test_a_purge_of_the_revision_seen_keeps_a_push_back_written_since(topology_bus: Bus) -> None:
    # A worker saw the ended record at `seen`; before its purge lands, another worker records a
    # fresh push-back for the same (source, site). The purge must not take that one away.
    js = topology_bus.js
    seen = await store_as_earlier_release(js, "gmail", time.time() - 2 * LEFT_BEHIND)
    writer = DeliveryControl(js)
    fresh = await writer.push_back(SOURCE, "gmail", HOUR, reply("try in an hour"))

    assert not await purge_ended(js, backoff_key(SOURCE, "gmail"), seen)

    kept = await record(js, "gmail")
    assert kept is not None and kept.data and Backoff.from_bytes(kept.data) == fresh


async def test_workers_purging_while_a_push_back_lands_keep_it(
    topology_bus: Bus, stop: asyncio.Event
) -> None:
    # The same race with real workers: four sweep every 0.2 s over an ended record while another
    # records a push-back on its key. Whichever lands first, the push-back is what stays.
    js = topology_bus.js
    await store_as_earlier_release(js, "gmail", time.time() - 2 * LEFT_BEHIND)
    async with running_controls(js, 4, sweep_every=SWEEP_EVERY) as sweepers:
        await asyncio.sleep(SWEEP_EVERY / 2)
        fresh = await DeliveryControl(js).push_back(SOURCE, "gmail", HOUR, reply("try in an hour"))
        await asyncio.sleep(5 * SWEEP_EVERY)  # several sweeps by every worker since

        kept = await record(js, "gmail")
        assert kept is not None and kept.data and Backoff.from_bytes(kept.data) == fresh
        for control in sweepers:
            assert control.backoff(SOURCE, "gmail") == fresh

"""A push-back back-off leaves the `relais-delivery-control` bucket and every worker's copy once it
has ended, never before; a back-off still running and a pause stay. Earlier releases kept every
(source, site) ever pushed back for good: in JetStream, in each worker's memory, and in the replay
every starting worker reads. On a real nats-server, read back as the workers' watches see it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from services.core.bus import Bus, leader_last
from services.core.outcome import Reply
from services.core.topology import DELIVERY_CONTROL_BUCKET, kv_stream, kv_subject
from services.delivery import pause
from services.delivery.control import Backoff, DeliveryControl, backoff_key
from services.delivery.shaping import Pushback
from tests.integration.delivery.conftest import running_controls

SOURCE = "127.0.0.21"
WORKERS = 2
# Seconds, not minutes, so that the test sees them end; long enough that every worker's watch
# has them before they do.
SHORT = Pushback("generic-421", re.compile("421"), duration=2.0, messages_per_minute=60)
LONGER_STRICT = Pushback("provider-rate", re.compile("rate limited"), duration=6.0, messages_per_minute=10)
HOUR = Pushback("provider-hour", re.compile("try in an hour"), duration=3600.0, messages_per_minute=10)
WAIT = 30.0  # the longest any step may take on a loaded machine


@pytest.fixture
async def workers(topology_bus: Bus) -> AsyncIterator[list[DeliveryControl]]:
    async with running_controls(topology_bus.js, WORKERS) as controls:
        yield controls


def reply(text: str) -> Reply:
    return Reply(421, "4.7.0", text, "DATA")


async def record(js: JetStreamContext, site: str) -> RawStreamMsg | None:
    """The last message stored for (SOURCE, site)'s key."""
    key = backoff_key(SOURCE, site)
    return await leader_last(js, kv_stream(DELIVERY_CONTROL_BUCKET), kv_subject(DELIVERY_CONTROL_BUCKET, key))


def holds_no_value(msg: RawStreamMsg | None) -> bool:
    """Nothing stored for the key, or only the marker of its removal, which expires in turn."""
    return msg is None or (not msg.data and "Nats-TTL" in (msg.headers or {}))


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def seen_by_all(workers: list[DeliveryControl], site: str, state: Backoff) -> None:
    async def check() -> bool:
        return all(w.backoff(SOURCE, site) == state for w in workers)

    await until(check, f"every worker's watch brings the back-off of {site}")


async def test_an_ended_back_off_leaves_the_bucket_and_every_worker_s_copy(
    topology_bus: Bus, workers: list[DeliveryControl]
) -> None:
    js = topology_bus.js
    first, second = workers
    await pause.pause(js, "site", "paused.test", reason="test")
    ended = await first.push_back(SOURCE, "ends.test", SHORT, reply("421 too many connections"))
    running = await second.push_back(SOURCE, "runs.test", HOUR, reply("try in an hour"))
    await seen_by_all(workers, "ends.test", ended)

    async def gone_from_bucket() -> bool:
        return holds_no_value(await record(js, "ends.test"))

    await until(gone_from_bucket, "the ended back-off is still stored")
    assert time.time() >= ended.until, "removed before it ended: the throttle lifted early"

    key = backoff_key(SOURCE, "ends.test")

    async def gone_from_copies() -> bool:
        return all(key not in w.held_keys() for w in workers)

    await until(gone_from_copies, "a worker still holds the ended back-off")
    # Pushed back again: written over the marker JetStream left in the ended one's place.
    again = await first.push_back(SOURCE, "ends.test", HOUR, reply("try in an hour"))
    stored_again = await record(js, "ends.test")
    assert stored_again is not None and stored_again.data and Backoff.from_bytes(stored_again.data) == again

    kept = await record(js, "runs.test")
    assert kept is not None and kept.data, "a running back-off stays stored"
    assert Backoff.from_bytes(kept.data) == running
    assert await pause.is_paused(js, "site", "paused.test"), "a pause never expires"
    for worker in workers:
        assert worker.backoff(SOURCE, "runs.test") == running
        assert worker.paused("site", "paused.test")


async def test_a_stricter_push_back_written_at_once_stays_until_its_own_end(
    topology_bus: Bus, workers: list[DeliveryControl]
) -> None:
    # Two workers record at once: a generic 421 for 2 s and the provider's 10/min for 6 s. The
    # merged record (10/min until the later end) must outlive the generic one's end: removed
    # with it, the provider's throttle would lift four seconds early.
    js = topology_bus.js
    first, second = workers
    # (Each writer returns what was stored, the other's if it came second: time them here.)
    started = time.time()
    await asyncio.gather(
        first.push_back(SOURCE, "gmail", SHORT, reply("421 too many connections")),
        second.push_back(SOURCE, "gmail", LONGER_STRICT, reply("rate limited")),
    )
    weak_end = time.time() + SHORT.duration  # the generic one ends by then at the latest
    stored = Backoff.from_bytes((await record(js, "gmail")).data)  # type: ignore[union-attr]
    assert stored.messages_per_minute == LONGER_STRICT.messages_per_minute
    assert stored.until >= started + LONGER_STRICT.duration
    await seen_by_all(workers, "gmail", stored)

    await asyncio.sleep(max(0.0, weak_end - time.time()) + 1.0)  # past the generic one's end
    after_weak = await record(js, "gmail")
    assert after_weak is not None and after_weak.data, "the stricter one was removed"
    assert Backoff.from_bytes(after_weak.data) == stored
    for worker in workers:
        assert worker.backoff(SOURCE, "gmail") == stored, "a worker lost the stricter back-off"

    async def gone_from_bucket() -> bool:
        return holds_no_value(await record(js, "gmail"))

    await until(gone_from_bucket, "the stricter back-off is still stored after its end")
    assert time.time() >= stored.until, "removed before it ended: the throttle lifted early"

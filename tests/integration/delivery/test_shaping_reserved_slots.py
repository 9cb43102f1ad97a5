"""What a reserved message slot is good for: it stays its job's until the job goes in it, and
none is reserved past the end of a push-back.

Asserted on the (source, site) clock in KV and on what the sink received, never on a speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack

from services.core.bus import Bus
from services.core.config import Config
from services.core.runtime import start_bus
from services.core.topology import SHAPING_BUCKET, deliver_subject
from services.delivery.limits import lease_key, slot_key
from services.delivery.service import SLOT_INTERVAL_META, SLOT_META, DeliveryService
from tests.integration.delivery.conftest import SOURCE_A, submit_many
from tests.support.relais import an_envelope, wait_for_events

SITE = "alpha.test"
RATE = f'[site."{SITE}"]\nmessages_per_minute = 6\n'  # one message every 10 s
INTERVAL = 10.0
CLOCK = slot_key("msg", SOURCE_A, SITE)


@asynccontextmanager
async def delivery_worker(config: Config) -> AsyncIterator[tuple[DeliveryService, Bus]]:
    """One delivery worker of this test's own, to read its counters, and its NATS connection;
    stopped on the way out."""
    bus = await start_bus(config, "test-delivery", attempts=3)
    worker = DeliveryService(config, bus)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker, bus
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 20)
        await bus.nc.close()


async def until_true(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def read_clock(bus: Bus) -> float:
    kv = await bus.js.key_value(SHAPING_BUCKET)
    return float(msgpack.unpackb((await kv.get(CLOCK)).value))


async def queue_ahead(bus: Bus, seconds: float) -> float:
    """The site's clock as a long queue leaves it: its next free slot `seconds` from now."""
    kv = await bus.js.key_value(SHAPING_BUCKET)
    tat = time.time() + seconds
    await kv.put(CLOCK, msgpack.packb(tat))
    return tat


async def publish_job(
    bus: Bus, recipient: str, slot_at: float | None = None, *, interval: float = INTERVAL, **fields: Any
) -> None:
    """A job of the site's, coming back for the slot it reserved at `interval` (the site's rate)
    if any, as its schedule re-publishes it."""
    slot = (
        {SLOT_META: f"{SOURCE_A}|{SITE}|{slot_at:.3f}", SLOT_INTERVAL_META: f"{interval:.3f}"}
        if slot_at
        else {}
    )
    env = an_envelope(
        recipient,
        job_id=f"job-{recipient.partition('@')[0]}",
        pool="default",
        domain=SITE,
        site=SITE,
        mx_hosts=(f"mx.{SITE}",),
        meta=slot,
        **fields,
    )
    await bus.js.publish(deliver_subject("default"), env.to_msgpack())


async def test_slots_taken_during_a_push_back_end_with_it(make_stack, make_sink, shaping_file) -> None:
    # An unlimited site pushed back to 6/min for 30 s. Ten jobs queued meanwhile used to take
    # slots 10 s apart, the last 100 s out: the push-back outlived itself as long as the queue
    # was (a week, for 100,000 messages to a provider's 1-hour push-back).
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    sink.tempfail_reply = "421 4.7.0 Too much mail from your IP, slow down"
    rules = '[[pushback]]\nname = "slow"\nmatch = "slow down"\nduration = "30s"\nmessages_per_minute = 6\n'
    stack = await make_stack(
        services=("ingress", "router", "bounce"),
        delivery={"shaping_file": shaping_file(rules), "max_shaping_wait": 1.0},
    )
    async with delivery_worker(stack.config) as (worker, bus):
        await submit_many(stack, 1, "first@alpha.test")
        await wait_for_events(stack.config.nats.url, "deferred", 1)
        backoff = worker.control.backoff(SOURCE_A, SITE)
        assert backoff is not None and backoff.interval() == INTERVAL

        await submit_many(stack, 10)
        await until_true(lambda: worker.postponed["shaping"] >= 10, "every queued job postponed")
        assert await read_clock(bus) <= backoff.until + INTERVAL + 1.0, "no slot past the push-back"

        got = await sink.async_wait_for(11, timeout=120)
        assert len({r for m in got for r in m.rcpt_tos}) == 11


async def test_a_job_back_before_its_slot_keeps_its_place(make_stack, make_sink, shaping_file) -> None:
    # The job's schedule fired 5 s before its slot (the NATS server's clock ahead of the
    # worker's). It used to reserve again, behind a queue 10 minutes long.
    sink = make_sink("127.0.0.2")
    stack = await make_stack(
        services=(), delivery={"shaping_file": shaping_file(RATE), "max_shaping_wait": 1.0}
    )
    async with delivery_worker(stack.config) as (worker, bus):
        tat = await queue_ahead(bus, 600.0)
        await publish_job(bus, "early@alpha.test", time.time() + 5.0)
        await until_true(lambda: worker.postponed["shaping"] >= 1, "the early job postponed")
        assert await read_clock(bus) == tat, "it took no slot of the queue's"

        (got,) = await sink.async_wait_for(1, timeout=60)
        assert got.rcpt_tos == ["early@alpha.test"]
        assert await read_clock(bus) == tat


async def test_a_job_that_found_every_connection_busy_keeps_its_slot(
    make_stack, make_sink, shaping_file
) -> None:
    # Its slot has come, but the site's only connection is another worker's. It used to lose
    # the slot and queue again behind 10 minutes of others.
    sink = make_sink("127.0.0.2")
    capped = RATE + "connections = 1\n"
    stack = await make_stack(
        services=(), delivery={"shaping_file": shaping_file(capped), "max_shaping_wait": 1.0}
    )
    async with delivery_worker(stack.config) as (worker, bus):
        kv = await bus.js.key_value(SHAPING_BUCKET)
        lease = lease_key(SOURCE_A, SITE)
        await kv.put(lease, msgpack.packb({"other-worker": [1, time.time() + 60.0, 0.0]}))
        tat = await queue_ahead(bus, 600.0)
        await publish_job(bus, "due@alpha.test", time.time())
        await until_true(lambda: worker.postponed["connection limit"] >= 1, "the job postponed")

        await kv.delete(lease)  # the other worker closed its connection
        (got,) = await sink.async_wait_for(1, timeout=60)
        assert got.rcpt_tos == ["due@alpha.test"]
        assert await read_clock(bus) == tat, "it went in its own slot"
        await wait_for_events(stack.config.nats.url, "delivered", 1)


async def test_a_slot_past_the_job_s_expiry_ends_the_job_at_its_expiry(
    make_stack, make_sink, shaping_file
) -> None:
    # The job has 3 s left before retry.max_age; the site's queue is 10 minutes long. It used to
    # wait for its slot and go after max_age (or, its body's TTL run out, never end at all).
    sink = make_sink("127.0.0.2")
    stack = await make_stack(
        services=("bounce",), delivery={"shaping_file": shaping_file(RATE), "max_shaping_wait": 1.0}
    )
    async with delivery_worker(stack.config) as (worker, bus):
        tat = await queue_ahead(bus, 600.0)
        received_at = time.time() - stack.config.retry.max_age + 3.0
        await publish_job(bus, "late@alpha.test", received_at=received_at)
        (expired,) = await wait_for_events(stack.config.nats.url, "expired", 1, timeout=60)
        assert expired.recipients == ["late@alpha.test"]
        assert worker.postponed["shaping"] == 1 and not sink.messages
        assert await read_clock(bus) == tat + INTERVAL, "the one slot it took"

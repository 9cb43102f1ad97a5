"""A routing pass repeated for the same attempt (the router died after counting a job against a
warming IP's cap and before its ack, so the message came back; or two replicas got it at once)
counts the job once: counted twice, the cap would under-send and defer later jobs for nothing.

Real routers on real NATS and DNS; as in test_one_fate_per_job.py, only the crash between the
passes is left out, as `route` is what a redelivered message runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from services.core.bus import Bus
from services.core.config import Config, PoolConfig, SourceConfig, WarmupConfig
from services.core.envelope import META_SOURCE, Envelope
from services.core.runtime import start_bus
from services.core.topology import DELIVER_STREAM, WARMUP_BUCKET, deliver_subject, verdict_subject
from services.router.service import RouterService
from services.router.warmup import OTHER_SCOPE, counter_key, utc_day
from tests.integration.router.conftest import account
from tests.support.relais import an_envelope

WARMING, WARM = "127.0.0.13", "127.0.0.14"
CAP = 3


def _warming_pool(*, overflow: str, warm_too: bool = False) -> dict[str, object]:
    # Started yesterday with the same cap every day, so a run across midnight keeps the cap.
    start = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    sources = [SourceConfig(address=WARMING, weight=5, warmup="new-ip", warmup_start=start)]
    if warm_too:
        sources.append(SourceConfig(address=WARM, weight=1))
    return dict(
        pools={"default": PoolConfig(), "warming": PoolConfig(sources=sources)},
        warmup={"new-ip": WarmupConfig(daily=[CAP] * 10, overflow=overflow)},
        accounts=account("warming"),
    )


@pytest.fixture
async def router_bus(make_stack) -> AsyncIterator[tuple[Config, Bus]]:
    """The configuration and a connection for routers of our own, on a pool warming with defer."""
    stack = await make_stack(services=(), **_warming_pool(overflow="defer"))
    bus = await start_bus(stack.config, "test-warmup-passes", attempts=5)
    try:
        yield stack.config, bus
    finally:
        with contextlib.suppress(Exception):
            await bus.close()


async def _counted(js: JetStreamContext, source: str, since: float) -> int:
    """What the source's counter holds for the UTC day(s) this test ran in."""
    kv = await js.key_value(WARMUP_BUCKET)
    total = 0
    for day in {utc_day(since), utc_day(time.time())}:
        with contextlib.suppress(KeyNotFoundError):
            total += int((await kv.get(counter_key(day, source, OTHER_SCOPE))).value or b"0")
    return total


async def _jobs(js: JetStreamContext) -> list[Envelope]:
    """The delivery jobs stored for the pool, read in place (the stream is a work queue)."""
    jobs, seq = [], 1
    while True:
        try:
            msg = await js.get_msg(DELIVER_STREAM, seq=seq, subject=deliver_subject("warming"), next=True)
        except NotFoundError:
            return jobs
        jobs.append(Envelope.from_msgpack(msg.data))
        seq = (msg.seq or seq) + 1


async def _verdicts(js: JetStreamContext) -> int:
    info = await js.stream_info(DELIVER_STREAM, subjects_filter=verdict_subject())
    return sum((info.state.subjects or {}).values())


async def test_a_pass_repeated_after_a_crash_counts_the_job_once(router_bus: tuple[Config, Bus]) -> None:
    config, bus = router_bus
    since = time.time()
    first = an_envelope("a@alpha.test")
    await RouterService(config, bus).route(first)
    await RouterService(config, bus).route(first)  # redelivered: its router died before the ack
    assert await _counted(bus.js, WARMING, since) == 1

    for _ in range(CAP - 1):  # what is left of the cap
        await RouterService(config, bus).route(an_envelope("a@alpha.test"))
    jobs = await _jobs(bus.js)
    assert len(jobs) == CAP and {j.meta[META_SOURCE] for j in jobs} == {WARMING}
    assert await _verdicts(bus.js) == 0, "no job within the cap was deferred"
    assert await _counted(bus.js, WARMING, since) == CAP


async def test_replicas_on_the_same_pass_count_it_once_and_agree(make_stack) -> None:
    stack = await make_stack(services=(), **_warming_pool(overflow="warm", warm_too=True))
    bus = await start_bus(stack.config, "test-warmup-race", attempts=5)
    try:
        since = time.time()
        for _ in range(4):
            message = an_envelope("a@alpha.test", "b@alpha.test")
            await asyncio.gather(*(RouterService(stack.config, bus).route(message) for _ in range(3)))
        jobs = await _jobs(bus.js)
        assert len(jobs) == 4
        # The warm source has no cap and so no counter: only jobs sent from WARMING are counted.
        from_warming = [j for j in jobs if j.meta.get(META_SOURCE) == WARMING]
        assert await _counted(bus.js, WARMING, since) == 2 * len(from_warming), "each counted once"
        assert await _counted(bus.js, WARM, since) == 0
    finally:
        with contextlib.suppress(Exception):
            await bus.close()

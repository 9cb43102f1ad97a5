"""`relais requeue` and `relais bounce-queue` against a schedule that fires (or is taken over by
another command) after the command read it: the job is skipped, never acted on twice. A
requeue that reads bounce-queue's claim (the schedule it replaced, due in an hour, before its
BounceNotice goes out) leaves it alone: taken over, it would fire at once, and the job be
delivered after its sender was told it bounced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.admin import queue
from services.core.bus import Bus
from services.core.schedule import publish_at
from services.core.topology import (
    BOUNCE_STREAM,
    DELIVER_STREAM,
    deliver_retry_subject,
    deliver_subject,
)
from tests.support.relais import an_envelope

HOUR = 3600.0


@pytest.fixture
def bus(topology_bus: Bus) -> Bus:
    return topology_bus


async def deferred_job(bus: Bus) -> queue.Scheduled:
    env = an_envelope("r@alpha.test", body=b"x\r\n", domain="alpha.test", job_id="j-0")
    await publish_at(
        bus,
        schedule_subject=deliver_retry_subject(env.job_id, 1),
        target_subject=deliver_subject("default"),
        payload=env.to_msgpack(),
        at=time.time() + HOUR,
    )
    [job] = [job async for job in queue.scheduled_jobs(bus)]
    return job


def replay(monkeypatch: pytest.MonkeyPatch, job: queue.Scheduled) -> None:
    """The command's scan returns the job as it was read, before what the test did since."""

    async def scheduled_jobs(bus: Bus, limit: int = 0) -> AsyncIterator[queue.Scheduled]:
        yield job

    monkeypatch.setattr(queue, "scheduled_jobs", scheduled_jobs)


async def stored(bus: Bus, stream: str, subject: str) -> int:
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def fire_now(bus: Bus, job: queue.Scheduled) -> None:
    """What the server does when the schedule is due: the job goes to its work subject."""
    await publish_at(
        bus, schedule_subject=job.subject, target_subject=job.target, payload=b"fired", at=time.time()
    )
    for _ in range(100):
        if await stored(bus, DELIVER_STREAM, job.target):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the schedule did not fire")


@pytest.mark.parametrize("command", ["requeue", "bounce-queue"])
async def test_a_schedule_that_fired_after_the_scan_is_left_alone(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    job = await deferred_job(bus)
    await fire_now(bus, job)
    replay(monkeypatch, job)
    done: list[Any]
    if command == "requeue":
        done = await queue.requeue(bus, "alpha.test")
    else:
        done = await queue.bounce_queue(bus, "alpha.test", "test")
    assert done == []
    await asyncio.sleep(1.5)  # a replacement due "now" would have fired by then
    assert await stored(bus, DELIVER_STREAM, job.target) == 1, "only the server's own firing"
    assert await stored(bus, BOUNCE_STREAM, ">") == 0, "no bounce for a job that went to delivery"


async def test_two_bounce_queue_runs_bounce_a_job_once(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    job = await deferred_job(bus)
    replay(monkeypatch, job)
    first = await queue.bounce_queue(bus, "alpha.test", "one")
    second = await queue.bounce_queue(bus, "alpha.test", "two")  # read the same schedule
    assert (len(first), len(second)) == (1, 0)
    assert await stored(bus, BOUNCE_STREAM, ">") == 1
    assert await stored(bus, DELIVER_STREAM, job.subject) == 0, "the claim was deleted"
    assert await stored(bus, DELIVER_STREAM, job.target) == 0


async def test_requeue_fires_the_job_once(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    job = await deferred_job(bus)
    replay(monkeypatch, job)
    assert len(await queue.requeue(bus, "alpha.test")) == 1
    assert await queue.requeue(bus, "alpha.test") == []  # a second run read the same schedule
    for _ in range(60):
        if await stored(bus, DELIVER_STREAM, job.target):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)
    assert await stored(bus, DELIVER_STREAM, job.target) == 1


async def test_requeue_leaves_a_job_that_bounce_queue_claimed(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await deferred_job(bus)
    take_over = queue._take_over
    requeued: list[queue.Scheduled] = []

    async def claim_then_requeue(bus: Bus, job: queue.Scheduled, at: float, **kwargs: bool) -> int | None:
        claim = await take_over(bus, job, at, **kwargs)
        if at > time.time() + HOUR / 2:  # bounce-queue's claim is stored: an operator requeues now
            requeued.extend(await queue.requeue(bus, "alpha.test"))
        return claim

    monkeypatch.setattr(queue, "_take_over", claim_then_requeue)
    assert len(await queue.bounce_queue(bus, "alpha.test", "mailbox gone")) == 1
    assert await stored(bus, BOUNCE_STREAM, ">") == 1
    assert requeued == [], "requeue took over bounce-queue's claim"
    await asyncio.sleep(1.5)  # a take-over due "now" would have fired by then
    assert await stored(bus, DELIVER_STREAM, job.target) == 0, "the bounced job went to delivery too"
    assert await stored(bus, DELIVER_STREAM, "relais.retry.>") == 0, "the claim was deleted"


async def test_deleting_a_claim_that_is_gone_already_succeeds(bus: Bus) -> None:
    job = await deferred_job(bus)
    await bus.js.delete_msg(DELIVER_STREAM, job.seq)  # the first try, whose answer was lost
    await queue._delete_claim(bus, DELIVER_STREAM, job.seq)

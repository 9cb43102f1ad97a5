"""`relais requeue` run while `relais bounce-queue` holds a job's claim: the job gets one fate.

bounce-queue replaces a job's schedule with a claim due in an hour, publishes the BounceNotice,
then deletes the claim. A requeue that reads the claim in between must leave it alone: taken
over, it fires at once and the job is delivered after its sender was told it bounced. And a
claim already gone (an earlier delete whose answer was lost) is no reason to fail the command.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.admin import queue
from services.core.bus import Bus
from services.core.schedule import publish_at
from services.core.topology import BOUNCE_STREAM, DELIVER_STREAM, deliver_retry_subject, deliver_subject
from tests.support.relais import an_envelope

HOUR = 3600.0


async def stored(bus: Bus, stream: str, subject: str) -> int:
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_requeue_leaves_a_job_that_bounce_queue_claimed(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = topology_bus
    env = an_envelope("r@alpha.test", domain="alpha.test", job_id="j-0")
    target = deliver_subject("default")
    await publish_at(
        bus,
        schedule_subject=deliver_retry_subject(env.job_id, 1),
        target_subject=target,
        payload=env.to_msgpack(),
        at=time.time() + HOUR,
    )
    take_over = queue._take_over
    requeued: list[queue.Scheduled] = []

    async def claim_then_requeue(bus: Bus, job: queue.Scheduled, at: float, **kwargs: bool) -> int | None:
        claim = await take_over(bus, job, at, **kwargs)
        if at > time.time() + HOUR / 2:  # bounce-queue's claim is stored: an operator requeues now
            requeued.extend(await queue.requeue(bus, "alpha.test"))
        return claim

    monkeypatch.setattr(queue, "_take_over", claim_then_requeue)
    bounced = await queue.bounce_queue(bus, "alpha.test", "mailbox gone")
    assert len(bounced) == 1
    assert await stored(bus, BOUNCE_STREAM, ">") == 1
    assert requeued == [], "requeue took over bounce-queue's claim"
    await asyncio.sleep(1.5)  # a take-over due "now" would have fired by then
    assert await stored(bus, DELIVER_STREAM, target) == 0, "the bounced job went to delivery too"
    assert await stored(bus, DELIVER_STREAM, "relais.retry.>") == 0, "the claim was deleted"


async def test_deleting_a_claim_that_is_gone_already_succeeds(topology_bus: Bus) -> None:
    bus = topology_bus
    env = an_envelope("r@alpha.test", domain="alpha.test", job_id="j-0")
    await publish_at(
        bus,
        schedule_subject=deliver_retry_subject(env.job_id, 1),
        target_subject=deliver_subject("default"),
        payload=env.to_msgpack(),
        at=time.time() + HOUR,
    )
    [job] = [job async for job in queue.scheduled_jobs(bus)]
    await bus.js.delete_msg(DELIVER_STREAM, job.seq)  # the first try, whose answer was lost
    await queue._delete_claim(bus, DELIVER_STREAM, job.seq)

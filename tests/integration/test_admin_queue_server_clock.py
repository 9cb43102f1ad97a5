"""`relais requeue` and `relais bounce-queue` run "from anywhere that reaches NATS", on a host
whose clock need not agree with the servers' (a clock set to local time read as UTC is hours
off). Schedules fire by the server's clock, so neither command may depend on its own:

- bounce-queue's claim must stay due an hour ahead for the server, or it fires while the
  BounceNotice goes out and the job is both retried and bounced (two outcomes);
- requeue's replacement must be due now for the server, not hours later."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from nats.js.api import Header
from nats.js.errors import NotFoundError

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


def admin_clock(monkeypatch: pytest.MonkeyPatch, offset: float) -> None:
    """The admin host's clock, `offset` seconds off the server's (the same machine's clock)."""
    monkeypatch.setattr(queue, "time", SimpleNamespace(time=lambda: time.time() + offset))


async def defer(bus: Bus, due_in: float) -> None:
    env = an_envelope("r@alpha.test", domain="alpha.test", site="alpha.test", job_id="j-0")
    await publish_at(
        bus,
        schedule_subject=deliver_retry_subject(env.key, 1),
        target_subject=deliver_subject("default"),
        payload=env.to_msgpack(),
        at=time.time() + due_in,
    )


async def stored(bus: Bus, stream: str, subject: str) -> int:
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


def due_at(header: str) -> float:
    return datetime.fromisoformat(header.removeprefix("@at ")).timestamp()


@pytest.mark.parametrize("due_in", [60.0, 5 * HOUR])
async def test_bounce_queue_claims_for_an_hour_of_the_servers_time_from_a_slow_clock(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch, due_in: float
) -> None:
    await defer(topology_bus, due_in)
    admin_clock(monkeypatch, -2 * HOUR)
    claims: list[tuple[float, float]] = []  # (due, stored), both by the server's clock
    delete_claim = queue._delete_claim

    async def inspect_then_delete(bus: Bus, stream: str, seq: int) -> None:
        try:
            claim = await bus.js.get_msg(stream, seq)
        except NotFoundError:
            raise AssertionError("the claim fired before the BounceNotice was out") from None
        assert claim.time is not None and claim.headers
        claims.append((due_at(claim.headers[Header.SCHEDULE]), claim.time.timestamp()))
        await delete_claim(bus, stream, seq)

    monkeypatch.setattr(queue, "_delete_claim", inspect_then_delete)
    assert len(await queue.bounce_queue(topology_bus, "alpha.test", "closed")) == 1
    [(due, stored_at)] = claims
    assert due - stored_at >= HOUR - 5, "the claim was due before an hour of the server's clock"
    assert await stored(topology_bus, BOUNCE_STREAM, ">") == 1
    assert await stored(topology_bus, DELIVER_STREAM, "relais.retry.>") == 0, "the claim was deleted"


async def test_requeue_from_a_fast_clock_retries_now(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await defer(topology_bus, 5 * HOUR)
    admin_clock(monkeypatch, 2 * HOUR)
    assert len(await queue.requeue(topology_bus, "alpha.test")) == 1
    # A guard, not a measure: a schedule due now fires within a second.
    for _ in range(300):
        if await stored(topology_bus, DELIVER_STREAM, deliver_subject("default")):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the requeued job did not go to delivery: due by the admin host's clock")

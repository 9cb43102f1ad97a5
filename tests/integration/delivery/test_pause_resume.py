"""Pausing a site or a source holds its mail (re-scheduled, not held by a consumer); resume releases it."""

from __future__ import annotations

import asyncio

import pytest

from services.core.bus import Bus
from services.delivery import pause
from services.delivery.control import DeliveryControl
from tests.integration.delivery.conftest import SOURCE_A, SOURCE_B, pools, submit_many
from tests.support.relais import read_events, wait_for_events


async def test_paused_site_waits_and_goes_after_resume(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack()
    js = stack._buses[0].js
    await pause.pause(js, "site", "alpha.test", reason="test")
    assert await pause.is_paused(js, "site", "alpha.test")
    assert [p.name for p in await pause.list_paused(js)] == ["alpha.test"]
    await asyncio.sleep(0.5)  # the workers' watch sees the flag

    await submit_many(stack, 3)
    await asyncio.sleep(3.0)  # three pause rechecks
    assert sink.messages == [], "nothing goes to a paused site"
    assert not [e for e in await read_events(stack.config.nats.url) if e.kind in ("deferred", "bounced")]

    assert await pause.resume(js, "site", "alpha.test")
    got = await sink.async_wait_for(3, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == [f"r{i}@alpha.test" for i in range(3)]
    events = await wait_for_events(stack.config.nats.url, "delivered", 3)
    assert {e.attempt for e in events} == {1}, "waiting while paused is not an attempt"
    assert not await pause.resume(js, "site", "alpha.test")


async def test_paused_source_is_skipped_for_the_other_source_of_the_pool(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(pools=pools(SOURCE_A, SOURCE_B))
    await pause.pause(stack._buses[0].js, "source", SOURCE_A)
    await asyncio.sleep(0.5)
    await submit_many(stack, 4)
    got = await sink.async_wait_for(4)
    assert {m.peer[0] for m in got} == {SOURCE_B}


async def test_a_worker_takes_no_job_before_it_has_read_the_pauses(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # KV slow at start: a worker that went ahead would send the mail of a paused pool or site.
    control = DeliveryControl(topology_bus.js)

    async def never_read(self: DeliveryControl) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(DeliveryControl, "_watch", never_read)
    stop = asyncio.Event()
    starting = asyncio.create_task(control.start(stop, report_every=0.1))
    await asyncio.sleep(0.5)
    assert not starting.done(), "still waiting for the pause state"
    stop.set()
    await asyncio.wait_for(starting, 5)
    await control.stop()

"""A resumed pause leaves nothing in the `relais-delivery-control` bucket for good: the purge
marker its resume writes expires after `DELIVERY_CONTROL_MARKER_TTL`, as those of ended back-offs
do, once every watching worker has seen it. A pause itself never expires, also one set again over
such a marker. Earlier releases kept every resumed pause's marker for ever: in JetStream and in
the replay every starting worker reads. On a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

import services.core.pause as core_pause
from services.core.bus import Bus, leader_last
from services.core.pause import PauseState, pause_key
from services.core.topology import DELIVERY_CONTROL_BUCKET, DELIVERY_CONTROL_MARKER_TTL, kv_stream, kv_subject
from services.delivery.control import DeliveryControl
from tests.integration.delivery.conftest import running_controls

WAIT = 30.0  # the longest any step may take on a loaded machine
SHORT_TTL = 1.0  # seconds, so that the test sees markers expire


@pytest.fixture
async def worker(topology_bus: Bus) -> AsyncIterator[DeliveryControl]:
    async with running_controls(topology_bus.js, 1) as (control,):
        yield control


async def record(js: JetStreamContext, site: str) -> RawStreamMsg | None:
    subject = kv_subject(DELIVERY_CONTROL_BUCKET, pause_key("site", site))
    return await leader_last(js, kv_stream(DELIVERY_CONTROL_BUCKET), subject)


async def until_gone(js: JetStreamContext, worker: DeliveryControl, site: str) -> None:
    deadline = time.monotonic() + WAIT
    while worker.paused("site", site) or await record(js, site) is not None:
        assert time.monotonic() < deadline, f"the resume of {site} stays in the bucket or the worker's copy"
        await asyncio.sleep(0.1)


async def test_a_resume_s_marker_expires_and_a_pause_never_does(
    topology_bus: Bus, worker: DeliveryControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = topology_bus.js
    state = PauseState(js)
    for site in ("live.test", "resumed.test", "again.test", "first.test"):
        await state.pause("site", site, reason="test")

    assert await state.resume("site", "first.test")
    marker = await record(js, "first.test")
    assert marker is not None and not marker.data, "the resume stores a purge marker"
    assert (marker.headers or {}).get("Nats-TTL") == str(int(DELIVERY_CONTROL_MARKER_TTL)), (
        "a resume's marker without a TTL stays in the bucket for ever"
    )

    # The same with markers that expire within the test.
    monkeypatch.setattr(core_pause, "DELIVERY_CONTROL_MARKER_TTL", SHORT_TTL)
    assert await state.resume("site", "resumed.test")
    assert await state.resume("site", "again.test")
    await state.pause("site", "again.test", reason="paused again over the marker")
    marked_at = time.monotonic()

    await until_gone(js, worker, "resumed.test")
    await asyncio.sleep(max(0.0, marked_at + SHORT_TTL + 2.0 - time.monotonic()))  # past every TTL
    for site in ("live.test", "again.test"):
        stored = await record(js, site)
        assert stored is not None and stored.data, f"the pause of {site} expired"
        assert "Nats-TTL" not in (stored.headers or {}), "a pause must not expire"
        assert worker.paused("site", site), f"the worker forgot the pause of {site}"
    assert [p.name for p in await state.paused()] == ["again.test", "live.test"]
    assert not worker.paused("site", "first.test") and not worker.paused("site", "resumed.test")

"""`relais status` RATES count events as they arrive, also once the events stream is as old as
its max_age (as many events leave it as arrive, so its stored counts stand still)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

from services.admin.status import collect_status
from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.events import Event, publish_event
from services.core.topology import EVENTS_STREAM, ensure_topology

PER_SECOND = 50


async def steadily(bus, kind: str) -> None:  # type: ignore[no-untyped-def]
    n = 0
    while True:
        n += 1
        event = Event(kind=kind, message_id=f"m{n}", account="acme", recipients=["r@alpha.test"])
        await publish_event(bus, event, msg_id=f"{kind}-{n}", record=False)
        await asyncio.sleep(1 / PER_SECOND)


async def test_rates_are_arrivals_on_a_stream_older_than_its_max_age(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-status-rates")
    await ensure_topology(bus.js, config)
    # A one-second max_age stands in for a cluster running longer than nats.events_max_age (the
    # config refuses one below the duplicate window, so the stream is changed here directly).
    events = (await bus.js.stream_info(EVENTS_STREAM)).config
    await bus.js.update_stream(replace(events, max_age=1.0, duplicate_window=1.0))
    publisher = asyncio.create_task(steadily(bus, "delivered"))
    try:
        await asyncio.sleep(2.0)  # past max_age: the stream holds about one second of events
        status = await collect_status(bus, interval=3.0, scan_sites=False)
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        await bus.close()
    assert PER_SECOND * 0.6 <= status.rates["delivered"] <= PER_SECOND * 1.2, status.rates
    assert status.rates["bounced"] == 0

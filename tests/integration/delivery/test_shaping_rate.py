"""A site's messages-per-minute rule holds over a run, with one delivery worker and with two.

Asserted as counts within a window of the sink's arrival times, never as a speed: shaping may
only ever make arrivals sparser, so a slow, loaded test machine cannot make these fail.
"""

from __future__ import annotations

import asyncio

from services.core.runtime import start_bus
from services.delivery.service import DeliveryService
from tests.integration.delivery.conftest import max_in_window, submit_many
from tests.support.relais import wait_for_events

# 120/min = one message every 0.5 s for (source 127.0.0.21, site alpha.test), cluster-wide.
RATE = """
[site."alpha.test"]
messages_per_minute = 120
"""
COUNT = 12
WINDOW = 2.0
ALLOWED = 4 + 1  # 2 s at 0.5 s spacing, plus one for the slot that starts the window


async def test_rate_rule_is_respected_by_one_worker(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"shaping_file": shaping_file(RATE)})
    await submit_many(stack, COUNT)
    got = await sink.async_wait_for(COUNT, timeout=60)
    assert len({r for m in got for r in m.rcpt_tos}) == COUNT
    assert max_in_window([m.received_at for m in got], WINDOW) <= ALLOWED
    await wait_for_events(stack.config.nats.url, "delivered", COUNT)


async def test_rate_rule_holds_across_two_delivery_workers(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(
        services=("ingress", "router", "bounce"),
        delivery={"shaping_file": shaping_file(RATE), "concurrency": 4},
    )
    stop = asyncio.Event()
    buses = [await start_bus(stack.config, f"test-delivery-{i}", attempts=3) for i in range(2)]
    workers = [DeliveryService(stack.config, bus) for bus in buses]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        await submit_many(stack, COUNT)
        got = await sink.async_wait_for(COUNT, timeout=60)
        assert len({r for m in got for r in m.rcpt_tos}) == COUNT
        assert all(w.attempts > 0 for w in workers), [w.attempts for w in workers]
        assert max_in_window([m.received_at for m in got], WINDOW) <= ALLOWED, "together, not each"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for bus in buses:
            await bus.nc.close()

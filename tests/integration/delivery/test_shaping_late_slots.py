"""A reserved slot carried in a job is void once the job comes back long after it was due: after
a delivery outage or a consumer backlog, every such job would otherwise go at once, a burst
past the site's rate. It takes a fresh slot through the (source, site) clock instead.

Asserted on what the sink received (the most arrivals within a window shorter than the site's
interval), never on a speed: shaping may only make arrivals sparser.
"""

from __future__ import annotations

import time

from tests.integration.delivery.conftest import max_in_window
from tests.integration.delivery.test_shaping_reserved_slots import SITE, delivery_worker, publish_job
from tests.support.relais import wait_for_events

INTERVAL = 3.0
RATE = f'[site."{SITE}"]\nmessages_per_minute = 20\n'  # one message every 3 s
JOBS = 4


async def test_jobs_back_long_after_their_slots_keep_the_site_s_rate(
    make_stack, make_sink, shaping_file
) -> None:
    # Four jobs reserved slots 3 s apart five minutes ago and were due back then, but no worker
    # ran meanwhile (an outage): all four reach the worker at once. They used to go at once too,
    # four messages in a second to a site that takes one every 3 s.
    sink = make_sink("127.0.0.2")
    stack = await make_stack(services=("bounce",), delivery={"shaping_file": shaping_file(RATE)})
    async with delivery_worker(stack.config) as (_, bus):
        past = time.time() - 300.0
        for i in range(JOBS):
            await publish_job(bus, f"r{i}@alpha.test", past + i * INTERVAL, interval=INTERVAL)

        got = await sink.async_wait_for(JOBS, timeout=90)
        assert sorted(r for m in got for r in m.rcpt_tos) == [f"r{i}@alpha.test" for i in range(JOBS)]
        assert max_in_window([m.received_at for m in got], INTERVAL - 0.5) == 1
        await wait_for_events(stack.config.nats.url, "delivered", JOBS)

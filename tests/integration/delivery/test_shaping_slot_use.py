"""A reserved shaping slot is used once, and a slot nobody waits for is not taken.

Asserted as gaps between the sink's arrival times, and as "all delivered", never as a speed:
shaping may only ever make arrivals sparser, so a loaded machine cannot make these fail.
"""

from __future__ import annotations

import itertools

from tests.integration.delivery.conftest import submit_many
from tests.support.relais import wait_for_events


async def test_a_retry_takes_a_slot_of_its_own(make_stack, make_sink, shaping_file) -> None:
    # 20/min, one message every 3 s. Jobs postponed to reserved slots, then deferred by the MX,
    # come back as retries: each must wait for a new slot, not go at once in the old one.
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 3
    rate = '[site."alpha.test"]\nmessages_per_minute = 20\n'
    stack = await make_stack(
        delivery={"shaping_file": shaping_file(rate), "max_shaping_wait": 0.5},
        retry={"base_delay": 1.0, "max_delay": 2.0},
    )
    await submit_many(stack, 3)
    got = await sink.async_wait_for(3, timeout=90)
    arrivals = sorted(m.received_at for m in got)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 2.5, gaps
    await wait_for_events(stack.config.nats.url, "delivered", 3)


async def test_a_slow_connection_rate_still_opens_connections_for_waiting_jobs(
    make_stack, make_sink, shaping_file
) -> None:
    # 20 new connections a minute, one message each, and jobs that will not wait the 3 s for a
    # slot (max_shaping_wait 1 s): each comes back later. Had each taken the slot it did not
    # use, every later one would be pushed out again and the site would never get a connection.
    sink = make_sink("127.0.0.2")
    rate = '[site."alpha.test"]\nmessages_per_connection = 1\nnew_connections_per_minute = 20\n'
    stack = await make_stack(delivery={"shaping_file": shaping_file(rate), "max_shaping_wait": 1.0})
    await submit_many(stack, 4)
    got = await sink.async_wait_for(4, timeout=60)
    assert sink.connections == 4
    gaps = [b - a for a, b in itertools.pairwise(sorted(sink.connected_at))]
    assert min(gaps) >= 2.5, gaps
    assert len({r for m in got for r in m.rcpt_tos}) == 4


async def test_a_pushback_voids_the_slots_reserved_at_the_faster_rate(
    make_stack, make_sink, shaping_file
) -> None:
    # 120/min until the MX answers "slow down", then 20/min (one every 3 s). Jobs postponed to
    # slots reserved at the faster rate must wait for slots at the slower one.
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    sink.tempfail_reply = "421 4.7.0 Too much mail from your IP, slow down"
    rules = (
        '[site."alpha.test"]\nmessages_per_minute = 120\n'
        '[[pushback]]\nname = "slow"\nmatch = "slow down"\nduration = "5m"\nmessages_per_minute = 20\n'
    )
    stack = await make_stack(
        delivery={"shaping_file": shaping_file(rules), "max_shaping_wait": 0.2},
        retry={"base_delay": 1.0, "max_delay": 2.0},
    )
    await submit_many(stack, 4)
    got = await sink.async_wait_for(4, timeout=90)
    gaps = [b - a for a, b in itertools.pairwise(sorted(m.received_at for m in got))]
    assert min(gaps) >= 2.5, gaps

"""A push-back holds the jobs already waiting for their message slot, not only those to come.

A job waits up to `max_shaping_wait` for a slot reserved at the site's rate. When the provider
pushes back meanwhile ("slow down"), going in that slot would send at the rate the provider
just refused, once per job waiting: it takes a slot at the pushed-back rate instead.
"""

from __future__ import annotations

from tests.integration.delivery.test_shaping_reserved_slots import (
    RATE,
    SITE,
    delivery_worker,
    publish_job,
    until_true,
)
from tests.support.relais import wait_for_events

SLOW_DOWN = '[[pushback]]\nname = "slow"\nmatch = "slow down"\nduration = "5m"\nmessages_per_minute = 1\n'


async def test_a_job_waiting_for_its_slot_keeps_to_a_push_back_begun_meanwhile(
    make_stack, make_sink, shaping_file
) -> None:
    # 6/min: of two jobs, one goes at once and the other waits 10 s for its slot. The first is
    # told to slow down (1/min); the second used to go at its slot all the same.
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    sink.tempfail_reply = "421 4.7.0 Too much mail from your IP, slow down"
    stack = await make_stack(
        services=(),
        delivery={"shaping_file": shaping_file(RATE + SLOW_DOWN), "max_shaping_wait": 15.0},
    )
    async with delivery_worker(stack.config) as (worker, bus):
        await publish_job(bus, "one@alpha.test")
        await publish_job(bus, "two@alpha.test")
        await wait_for_events(stack.config.nats.url, "deferred", 1)
        assert worker.pushbacks, "the first attempt was pushed back"
        await until_true(
            lambda: bool(sink.messages) or worker.postponed["shaping"] > 0, "the waiting job's turn", 40.0
        )
        assert not sink.messages, f"sent at the rate the provider refused, to {SITE}"
        assert worker.postponed["shaping"] == 1 and worker.attempts == 1

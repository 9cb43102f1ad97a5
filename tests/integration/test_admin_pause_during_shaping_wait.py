"""`relais pause site` while a delivery worker holds a job of the site, waiting in its memory for
the job's message slot (a rate rule; at most `delivery.max_shaping_wait`): the job had not begun
its transaction, yet it went out seconds after the pause was set and every worker had seen it.
A pause holds every job that has not started sending; after resume, the job goes once, with no
attempt counted for the wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.delivery import pause
from tests.integration.delivery.conftest import (  # noqa: F401 - fixtures
    _stop_made_stacks,
    make_stack,
    shaping_file,
    submit_many,
    zone,
)
from tests.support.relais import read_events, wait_for_events
from tests.support.smtp_sink import SMTPSink

# One message every 4 s for (source, alpha.test): the second job waits its slot in the worker,
# under max_shaping_wait (5 s in these fixtures), rather than being re-scheduled.
RATE = """
[site."alpha.test"]
messages_per_minute = 15
"""


async def test_a_job_waiting_for_its_slot_is_held_by_a_pause_set_meanwhile(
    make_stack: Callable[..., Any],  # noqa: F811 - the fixtures imported above
    make_sink: Callable[..., SMTPSink],
    shaping_file: Callable[[str], str],  # noqa: F811
) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"shaping_file": shaping_file(RATE)})
    js = stack._buses[0].js
    await submit_many(stack, 2)
    (first,) = await sink.async_wait_for(1, timeout=20)
    await pause.pause(js, "site", "alpha.test", reason="incident")
    await asyncio.sleep(6.0)  # past the second job's slot, and the pause rechecks after it
    assert [m.rcpt_tos for m in sink.messages] == [first.rcpt_tos], "nothing goes after the pause"
    assert not [e for e in await read_events(stack.config.nats.url) if e.kind in ("deferred", "bounced")]

    assert await pause.resume(js, "site", "alpha.test")
    got = await sink.async_wait_for(2, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["r0@alpha.test", "r1@alpha.test"]
    events = await wait_for_events(stack.config.nats.url, "delivered", 2)
    assert {e.attempt for e in events} == {1}, "waiting while paused is not an attempt"

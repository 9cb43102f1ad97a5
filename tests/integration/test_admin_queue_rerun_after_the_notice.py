"""`relais bounce-queue` run again after a run that died between its notice's ack and the
"noticed" mark on its claim, once JetStream's duplicate window has passed: the rerun finds the
notice (still waiting in the bounce stream, or handled, as its `bounced` events) and only
deletes the claim. It used to publish a second notice, and with `bounce.dsn_window = 0` the
sender got two DSNs and the `bounced` event went out twice."""

from __future__ import annotations

import asyncio
import email
from collections.abc import Callable
from typing import Any

import pytest

from services.admin import queue
from services.bounce.dsn import SUBJECT_FAILED
from services.core.bus import Bus, connect
from services.core.topology import (
    BOUNCE_CONSUMER,
    BOUNCE_STREAM,
    DELIVER_STREAM,
    EVENTS_STREAM,
    SUBMIT_CONSUMER,
    SUBMIT_STREAM,
    delivery_consumer,
)
from tests.integration.bounce.conftest import wait_consumed
from tests.integration.spine.conftest import (  # noqa: F401 - fixtures
    _stop_made_stacks,
    make_stack,
    sender_mx,
    zone,
)
from tests.integration.test_admin_queue_race import deferred_job
from tests.integration.test_admin_queue_rerun import RunDied, assert_bounced_once
from tests.support.relais import RelaisStack, asubmit, message, read_events, wait_for_events
from tests.support.smtp_sink import SMTPSink

SITE = "alpha.test"


@pytest.fixture
def bus(topology_bus: Bus) -> Bus:
    return topology_bus


async def run_dying_before_the_mark(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bounce-queue run whose notice is acked, and which dies before marking its claim."""
    take_over = queue._take_over

    async def dies_at_the_mark(*args: Any, noticed: str = "", **kwargs: Any) -> int | None:
        if noticed:
            raise RunDied("before the noticed mark")
        return await take_over(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(queue, "_take_over", dies_at_the_mark)
        with pytest.raises(RunDied):
            await queue.bounce_queue(bus, SITE, "mailbox gone")


async def past_the_duplicate_windows(bus: Bus, *streams: str) -> None:
    """Let JetStream forget msg ids, as it does minutes later in production."""
    for stream in streams:
        info = await bus.js.stream_info(stream)
        info.config.duplicate_window = 0.2
        await bus.js.update_stream(info.config)
    await asyncio.sleep(0.5)


async def test_a_rerun_finds_the_notice_still_waiting_for_the_bounce_service(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deferred_job(bus)
    await run_dying_before_the_mark(bus, monkeypatch)
    await past_the_duplicate_windows(bus, BOUNCE_STREAM)
    assert len(await queue.bounce_queue(bus, SITE, "mailbox gone")) == 1
    await assert_bounced_once(bus)


async def test_a_rerun_finds_the_notice_the_bounce_service_handled(
    make_stack: Callable[..., Any],  # noqa: F811 - the spine's fixture
    make_sink: Callable[..., SMTPSink],
    sender_mx: SMTPSink,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack: RelaisStack = await make_stack(
        bounce={"dsn_window": 0.0}, retry={"base_delay": 600.0, "max_delay": 600.0}
    )
    make_sink("127.0.0.2").tempfail_data = 1000
    assert (await asubmit(stack.smtp_address, recipients=["ann@alpha.test"], data=message()))[0] == 250
    url = stack.config.nats.url
    await wait_for_events(url, "deferred", 1)  # its retry waits ten minutes in its schedule

    bus = await connect(stack.config.nats, "test-admin")
    try:
        await run_dying_before_the_mark(bus, monkeypatch)
        (dsn,) = await sender_mx.async_wait_for(1)
        assert email.message_from_bytes(dsn.data)["Subject"] == SUBJECT_FAILED
        await wait_consumed(url, BOUNCE_STREAM, BOUNCE_CONSUMER)
        # The DSN's and the event's msg ids are forgotten as well: nothing downstream would
        # drop a second notice's.
        await past_the_duplicate_windows(bus, BOUNCE_STREAM, SUBMIT_STREAM, EVENTS_STREAM)

        assert len(await queue.bounce_queue(bus, SITE, "mailbox gone")) == 1
        assert [job async for job in queue.scheduled_jobs(bus)] == [], "the claim was deleted"
    finally:
        await bus.close()
    await wait_consumed(url, BOUNCE_STREAM, BOUNCE_CONSUMER)
    await wait_consumed(url, SUBMIT_STREAM, SUBMIT_CONSUMER)  # the message and its DSN
    await wait_consumed(url, DELIVER_STREAM, delivery_consumer("default"))
    assert len(sender_mx.messages) == 1, "one DSN"
    assert len([e for e in await read_events(url) if e.kind == "bounced"]) == 1

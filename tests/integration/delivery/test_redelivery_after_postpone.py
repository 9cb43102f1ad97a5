"""A delivery job its worker postponed (here: its site paused), whose ack was then lost, goes on
as one copy: the one its postponement's schedule brings back. The redelivered original finds the
postponement and is acked without acting, whether the schedule is still waiting or has fired.

The ack is lost as in test_redelivery_after_settle.py: the one call that makes it
(`bus._confirm_ack`) naks the job instead, and JetStream hands it out again at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.msg import Msg

import services.core.bus as bus_module
from services.delivery import pause
from tests.support.relais import RelaisStack, asubmit, message, read_events, wait_for_events

SITE = "alpha.test"
PAUSE_RECHECK = 3.0


class LostPostponedAck:
    """The first ack of the delivery worker (the postponed job's) never lands: `before_loss`
    runs, then the job is nak'ed and comes back at once as a redelivery."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, before_loss: Callable[[], Awaitable[None]]) -> None:
        self.lost = 0
        self.acked: list[int] = []  # num_delivered of each job whose ack landed
        real = bus_module._confirm_ack

        async def confirm(msg: Msg) -> None:
            if not self.lost:
                self.lost += 1
                await before_loss()
                await msg.nak()
                return
            await real(msg)
            self.acked.append(msg.metadata.num_delivered)

        monkeypatch.setattr(bus_module, "_confirm_ack", confirm)

    async def redelivered_and_acked(self) -> None:
        await until(lambda: any(n > 1 for n in self.acked), "no redelivered job was acked")


async def until(condition: Callable[[], bool], failure: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.05)


async def paused_stack(make_stack) -> RelaisStack:
    stack = await make_stack(delivery={"pause_recheck": PAUSE_RECHECK})
    await pause.pause(stack._buses[0].js, "site", SITE, reason="test")
    await asyncio.sleep(0.5)  # the workers' watch sees the flag
    return stack


async def resume(stack: RelaisStack) -> None:
    assert await pause.resume(stack._buses[0].js, "site", SITE)
    await asyncio.sleep(0.5)  # the workers' watch sees it


async def delivered_to(url: str) -> list[list[str]]:
    return [list(e.recipients) for e in await read_events(url) if e.kind == "delivered"]


async def test_a_postponed_job_whose_ack_was_lost_goes_once_when_resumed_before_it_came_back(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")

    async def resume_first() -> None:
        # The redelivered copy finds the site open: sent again as it is, it would go now and
        # once more when the postponement's schedule fires.
        await resume(stack)

    acks = LostPostponedAck(monkeypatch, resume_first)
    stack = await paused_stack(make_stack)
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250

    await acks.redelivered_and_acked()
    await sink.async_wait_for(1, timeout=PAUSE_RECHECK + 20)
    await wait_for_events(url, "delivered", 1)
    await asyncio.sleep(PAUSE_RECHECK + 1.0)  # past any schedule still to fire
    assert acks.lost == 1
    assert [m.rcpt_tos for m in sink.messages] == [["r@alpha.test"]], "one copy of the job went on"
    assert await delivered_to(url) == [["r@alpha.test"]]


async def test_a_postponed_job_whose_ack_was_lost_after_its_schedule_fired_is_not_sent_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_rcpt = 2.0  # the schedule's copy is still in its transaction when the job comes back

    async def schedule_fires_and_its_copy_goes() -> None:
        # The ack hangs until the schedule's copy (a new message, delivered once) is on its way
        # to the MX: the schedule is gone when the original comes back, and nothing of the
        # attempt is stored yet. Only the postponement itself can tell.
        await resume(stack)
        await until(lambda: sink.connections > 0, "the schedule's copy never reached the MX")

    acks = LostPostponedAck(monkeypatch, schedule_fires_and_its_copy_goes)
    stack = await paused_stack(make_stack)
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250

    await acks.redelivered_and_acked()
    await wait_for_events(url, "delivered", 1)
    await asyncio.sleep(sink.delay_rcpt + 1.0)  # past a second transaction, had one started
    assert acks.lost == 1
    assert sink.connections == 1, "one SMTP transaction"
    assert [m.rcpt_tos for m in sink.messages] == [["r@alpha.test"]], "one copy of the job went on"
    assert await delivered_to(url) == [["r@alpha.test"]]


async def test_a_job_postponed_again_and_again_goes_once_after_resume(make_stack, make_sink) -> None:
    # Each postponement is stored under a msg id of its own job message: one per job would have
    # the second dropped as the first's duplicate (within the duplicate window), and the mail lost.
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"pause_recheck": 1.0})
    await pause.pause(stack._buses[0].js, "site", SITE, reason="test")
    await asyncio.sleep(0.5)
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250

    await asyncio.sleep(4.0)  # several rechecks, each a postponement of the schedule's copy
    assert sink.messages == []
    await resume(stack)
    await sink.async_wait_for(1)
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    await asyncio.sleep(1.5)
    assert [m.rcpt_tos for m in sink.messages] == [["r@alpha.test"]]

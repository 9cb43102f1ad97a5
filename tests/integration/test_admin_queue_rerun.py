"""`relais bounce-queue` run again after a run that failed midway: each job still gets exactly
one BounceNotice (so its sender one DSN), whether the failed run had published it or not, and
whether the rerun comes within JetStream's duplicate window or after it."""

from __future__ import annotations

import asyncio

import pytest

from services.admin import queue
from services.core.bus import Bus
from services.core.topology import BOUNCE_STREAM, DELIVER_STREAM, deliver_subject
from tests.integration.test_admin_queue_race import deferred_job, stored


class RunDied(Exception):
    """The command stopped here: broker trouble past its retries, or an operator's Ctrl-C."""


@pytest.fixture
def bus(topology_bus: Bus) -> Bus:
    return topology_bus


def dies_at(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    async def die(*args: object, **kwargs: object) -> None:
        raise RunDied(step)

    monkeypatch.setattr(queue, step, die)


async def failed_run(bus: Bus, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    with monkeypatch.context() as patched:
        dies_at(patched, step)
        with pytest.raises(RunDied):
            await queue.bounce_queue(bus, "alpha.test", "mailbox gone")


async def past_the_duplicate_window(bus: Bus) -> None:
    """JetStream forgets msg ids after the bounce stream's duplicate window (minutes in
    production): shrink it and let it pass, as an operator who reruns the next day would."""
    info = await bus.js.stream_info(BOUNCE_STREAM)
    info.config.duplicate_window = 0.2
    await bus.js.update_stream(info.config)
    await asyncio.sleep(0.5)


async def assert_bounced_once(bus: Bus) -> None:
    assert await stored(bus, BOUNCE_STREAM, ">") == 1, "one notice, so one DSN"
    assert await stored(bus, DELIVER_STREAM, "relais.retry.>") == 0, "the claim was deleted"
    assert await stored(bus, DELIVER_STREAM, deliver_subject("default")) == 0, "and never delivered"


async def test_a_rerun_after_a_run_that_died_with_the_notice_out_sends_no_second(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deferred_job(bus)
    await failed_run(bus, monkeypatch, "_delete_claim")
    assert await stored(bus, BOUNCE_STREAM, ">") == 1
    assert len(await queue.bounce_queue(bus, "alpha.test", "mailbox gone")) == 1
    await assert_bounced_once(bus)


async def test_a_rerun_after_the_duplicate_window_sends_no_second_notice_either(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deferred_job(bus)
    await failed_run(bus, monkeypatch, "_delete_claim")
    await past_the_duplicate_window(bus)
    assert len(await queue.bounce_queue(bus, "alpha.test", "mailbox gone")) == 1
    await assert_bounced_once(bus)


async def test_a_rerun_after_a_run_that_died_before_the_notice_sends_it(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deferred_job(bus)
    await failed_run(bus, monkeypatch, "_publish_notice")
    assert await stored(bus, BOUNCE_STREAM, ">") == 0
    await past_the_duplicate_window(bus)
    assert len(await queue.bounce_queue(bus, "alpha.test", "mailbox gone")) == 1
    await assert_bounced_once(bus)

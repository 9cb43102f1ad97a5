"""A weaker push-back does not lift a stricter one: the back-off stored for (source, site) keeps
the lower rate and the later end of the two, whoever writes last, also when workers write at
once. On real NATS KV, read back as every worker's watch sees it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest

from services.core.bus import Bus
from services.core.outcome import Reply
from services.core.topology import DELIVERY_CONTROL_BUCKET
from services.delivery.control import Backoff, DeliveryControl, backoff_key
from services.delivery.shaping import Pushback
from tests.integration.delivery.conftest import running_controls

SOURCE, SITE = "127.0.0.21", "gmail"
PROVIDER = Pushback("provider-rate", re.compile("rate limited"), duration=3600.0, messages_per_minute=10)
GENERIC = Pushback("generic-421", re.compile("421"), duration=300.0, messages_per_minute=60)
WORKERS = 4


@pytest.fixture
async def workers(topology_bus: Bus) -> AsyncIterator[list[DeliveryControl]]:
    """The control of `WORKERS` delivery workers, each watching the bucket; stopped on the way out."""
    async with running_controls(topology_bus.js, WORKERS) as controls:
        yield controls


async def stored(bus: Bus) -> Backoff:
    kv = await bus.js.key_value(DELIVERY_CONTROL_BUCKET)
    return Backoff.from_bytes((await kv.get(backoff_key(SOURCE, SITE))).value)


def reply(text: str) -> Reply:
    return Reply(421, "4.7.0", text, "DATA")


async def test_a_later_generic_421_keeps_the_provider_s_back_off(
    topology_bus: Bus, workers: list[DeliveryControl]
) -> None:
    # The provider asked for 10/min for an hour; a generic 421 a moment later (60/min for 5 min)
    # used to replace it, and the throttle lifted after 5 minutes at six times the rate.
    first, second = workers[:2]
    strict = await first.push_back(SOURCE, SITE, PROVIDER, reply("rate limited, try later"))
    state = await second.push_back(SOURCE, SITE, GENERIC, reply("too many connections"))

    kept = await stored(topology_bus)
    assert kept.messages_per_minute == PROVIDER.messages_per_minute
    assert kept.until >= strict.until, "it ends no earlier than the provider asked"
    assert kept.rule == PROVIDER.name
    assert state == kept, "the writer acts on what was stored, not on its own rule"


async def test_a_stricter_push_back_replaces_a_weaker_one_and_keeps_its_end(
    topology_bus: Bus, workers: list[DeliveryControl]
) -> None:
    first, second = workers[:2]
    weak = await first.push_back(SOURCE, SITE, GENERIC, reply("too many connections"))
    await second.push_back(SOURCE, SITE, PROVIDER, reply("rate limited, try later"))

    kept = await stored(topology_bus)
    assert kept.messages_per_minute == PROVIDER.messages_per_minute
    assert kept.until >= weak.until


async def test_workers_writing_at_once_cannot_lose_the_stricter_back_off(
    topology_bus: Bus, workers: list[DeliveryControl]
) -> None:
    # One worker records the provider's back-off while the others record generic ones, all at
    # the same moment: whichever write lands last, the stricter one stays.
    writes = [
        control.push_back(SOURCE, SITE, PROVIDER if i == 0 else GENERIC, reply(f"reply {i}"))
        for i, control in enumerate(workers)
    ]
    await asyncio.gather(*writes)

    kept = await stored(topology_bus)
    assert kept.messages_per_minute == PROVIDER.messages_per_minute
    assert kept.until > time.time() + GENERIC.duration
    for control in workers:  # and every worker's watch comes to see it
        deadline = time.monotonic() + 10.0
        while control.backoff(SOURCE, SITE) != kept:
            assert time.monotonic() < deadline, "a worker kept another back-off"
            await asyncio.sleep(0.05)

"""The ingress's measure of its clock against a real nats-server's (`ServerClock`), which
`accept_by` is written in: measured to within half a round trip, reported when it is off by
more than `WARN_OFFSET`, measured again at once when the host's clock is stepped, and measured
as soon as the servers answer when they did not at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ensure_topology
from services.ingress.server_clock import WARN_OFFSET, ServerClock
from tests.support.clock import skew_ingress_clock

# The measure is off by at most half a round trip on loopback, plus scheduling on a busy machine.
CLOSE = 0.5


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(NatsConfig(url=nats_server.url), "test-server-clock")
    try:
        yield bus
    finally:
        await bus.close()


async def until(condition: object, within: float = 10.0) -> None:
    for _ in range(int(within / 0.1)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("not within the time allowed")


@pytest.mark.parametrize("skew", [-60.0, 0.0, 60.0], ids=["behind", "in-sync", "ahead"])
async def test_the_offset_is_the_servers_clock_minus_this_hosts(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, skew: float
) -> None:
    await ensure_topology(bus.js, Config())
    skew_ingress_clock(monkeypatch, skew)
    clock = ServerClock(bus)
    with caplog.at_level(logging.INFO, logger="services.ingress.server_clock"):
        assert await clock.sample()
    assert clock.offset == pytest.approx(-skew, abs=CLOSE)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warned) == (abs(skew) > WARN_OFFSET)
    if warned:
        text = warned[0].getMessage()
        assert ("behind" if skew < 0 else "ahead of") in text and "delivery's leases" in text


async def test_a_stepped_clock_is_measured_again_at_once(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """NTP steps the clock between two samples (30 s apart): the offset follows within seconds."""
    await ensure_topology(bus.js, Config())
    host = skew_ingress_clock(monkeypatch, 0.0)
    clock = ServerClock(bus, interval=600.0)
    assert await clock.sample()
    assert clock.offset == pytest.approx(0.0, abs=CLOSE)
    sampling = asyncio.create_task(clock.keep_sampling())
    try:
        host.offset = -60.0
        await until(lambda: abs(clock.offset - 60.0) < CLOSE, within=5.0)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling


async def test_servers_not_answering_yet_leave_the_offset_at_zero_then_it_is_measured(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At start the submit stream does not exist yet (no leader answers for it): the ingress
    goes on with offset 0 and measures again soon, not at the next interval."""
    skew_ingress_clock(monkeypatch, -60.0)
    clock = ServerClock(bus, interval=600.0, retry=0.5)
    with caplog.at_level(logging.WARNING, logger="services.ingress.server_clock"):
        assert not await clock.sample()
    assert clock.offset == 0.0
    assert any("could not read the NATS servers' clock" in r.getMessage() for r in caplog.records)

    sampling = asyncio.create_task(clock.keep_sampling())
    try:
        await asyncio.sleep(1.0)
        await ensure_topology(bus.js, Config())
        await until(lambda: abs(clock.offset - 60.0) < CLOSE, within=5.0)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling

"""Bus.background: publishes that do not hold an ack back are still all stored, and close waits."""

from __future__ import annotations

from nats.js.api import StreamConfig

from services.core import bus as transport
from services.core.bus import connect
from services.core.config import NatsConfig
from services.core.embedded import EmbeddedNats


async def test_background_publishes_are_bounded_and_all_stored_by_close(
    nats_server: EmbeddedNats, monkeypatch
) -> None:
    monkeypatch.setattr(transport, "BACKGROUND_MAX", 8)
    bus = await connect(NatsConfig(url=nats_server.url), "test-background")
    await bus.js.add_stream(StreamConfig(name="BG", subjects=["bg.>"]))
    running = peak = 0

    async def publish(i: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await bus.publish(f"bg.{i}", b"x", msg_id=f"bg-{i}")
        finally:
            running -= 1

    for i in range(100):
        await bus.background(publish(i), f"bg {i}")
    await bus.background(bus.publish("nowhere.at.all", b"x", timeout=0.5), "lost on purpose")
    await bus.close()  # waits for every background publish, then drains
    assert 1 < peak <= 8, "in flight at once, and bounded"

    check = await connect(NatsConfig(url=nats_server.url), "test-background-check")
    try:
        assert (await check.js.stream_info("BG")).state.messages == 100
    finally:
        await check.nc.close()

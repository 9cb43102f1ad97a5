"""Stored bodies read with direct gets: the same bytes as the Object Store's own read."""

from __future__ import annotations

import os

import pytest

from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ensure_topology


@pytest.mark.parametrize("size", [1, 128 * 1024, 3 * 1024 * 1024 + 5])
async def test_a_stored_body_reads_back_byte_for_byte(nats_server: EmbeddedNats, size: int) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-bodies")
    try:
        await ensure_topology(bus.js, config)
        writer = BodyStore(bus.js, inline_max=0)
        data = os.urandom(size)
        await writer.put("other", os.urandom(200_000))  # chunks of another body in between
        ref = await writer.put("m1", data)
        assert ref.inline is None

        direct, plain = BodyStore(bus.js, 0, bus), BodyStore(bus.js, 0)
        assert await direct.get(ref) == data
        assert await plain.get(ref) == data

        await writer.discard(ref)
        with pytest.raises(BodyMissing):
            await direct.get(ref)
    finally:
        await bus.close()

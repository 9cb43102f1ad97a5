"""The `relais-delivery-control` bucket as an earlier release made it (no per-message TTLs): the
check of services that do not declare the topology names that setting, not the bucket, and
`ensure_topology` turns it on in place, keeping the pauses and back-offs stored. Back-offs then
expire. On a real nats-server."""

from __future__ import annotations

import asyncio
import re
import time

from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig

from services.core.bus import connect, leader_last
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.outcome import Reply
from services.core.topology import (
    DELIVERY_CONTROL_BUCKET,
    ensure_topology,
    kv_stream,
    kv_subject,
    missing_topology,
)
from services.delivery import pause
from services.delivery.control import Backoff, DeliveryControl, backoff_key
from services.delivery.shaping import Pushback

SOURCE = "127.0.0.21"
SHORT = Pushback("generic-421", re.compile("421"), duration=1.0, messages_per_minute=60)
STREAM = kv_stream(DELIVERY_CONTROL_BUCKET)


def as_earlier_release() -> StreamConfig:
    """The bucket's stream as nats-py made it before it turned per-message TTLs on."""
    return StreamConfig(
        name=STREAM,
        subjects=[f"$KV.{DELIVERY_CONTROL_BUCKET}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        max_msgs_per_subject=1,
        max_msgs=-1,
        num_replicas=1,
        storage=StorageType.FILE,
    )


async def test_an_earlier_bucket_is_brought_to_expiring_back_offs_keeping_its_data(
    nats_server: EmbeddedNats,
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url, declare_topology=False))
    bus = await connect(config.nats, "test-topology")
    try:
        await bus.js.add_stream(as_earlier_release())
        kv = await bus.js.key_value(DELIVERY_CONTROL_BUCKET)
        running = Backoff(time.time() + 3600, 10.0, "provider-hour", "421 try in an hour")
        await kv.put(backoff_key(SOURCE, "runs.test"), running.to_bytes())
        await pause.pause(bus.js, "site", "paused.test", reason="test")

        missing = await missing_topology(bus.js, config)
        assert f"{STREAM} per-message TTL" in missing, "a worker's writes with a TTL would be refused"
        assert STREAM not in missing, "the bucket is there"

        await ensure_topology(bus.js, config)
        await ensure_topology(bus.js, config)  # idempotent once upgraded

        assert await missing_topology(bus.js, config) == []
        declared = (await bus.js.stream_info(STREAM)).config
        assert declared.allow_msg_ttl and declared.subject_delete_marker_ttl
        assert not declared.max_age, "no bucket TTL: pauses never expire"
        assert Backoff.from_bytes((await kv.get(backoff_key(SOURCE, "runs.test"))).value) == running
        assert await pause.is_paused(bus.js, "site", "paused.test")

        ended = await DeliveryControl(bus.js).push_back(
            SOURCE, "ends.test", SHORT, Reply(421, "4.7.0", "421", "DATA")
        )
        subject = kv_subject(DELIVERY_CONTROL_BUCKET, backoff_key(SOURCE, "ends.test"))
        deadline = time.monotonic() + 30.0
        while (msg := await leader_last(bus.js, STREAM, subject)) is not None and msg.data:
            assert time.monotonic() < deadline, "a back-off in the upgraded bucket does not expire"
            await asyncio.sleep(0.1)
        assert time.time() >= ended.until
    finally:
        await bus.close()


async def test_a_bucket_with_ttls_but_no_expiry_markers_is_not_reported_missing(
    nats_server: EmbeddedNats,
) -> None:
    # As nats-py 2.16 makes any bucket: per-message TTLs on, no markers. The workers can write
    # their back-offs there (and forget ended ones in their sweep), so services that do not
    # declare the topology must not wait for it; `ensure_topology` adds the markers.
    config = Config(nats=NatsConfig(url=nats_server.url, declare_topology=False))
    bus = await connect(config.nats, "test-topology")
    try:
        await bus.js.create_key_value(KeyValueConfig(bucket=DELIVERY_CONTROL_BUCKET, direct=True))

        assert not [what for what in await missing_topology(bus.js, config) if what.startswith(STREAM)]

        await ensure_topology(bus.js, config)
        assert (await bus.js.stream_info(STREAM)).config.subject_delete_marker_ttl
    finally:
        await bus.close()

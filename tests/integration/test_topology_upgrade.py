"""ensure_topology on streams and buckets another release created: an earlier one's are brought
to the declared shape in place, and a later one's additions are left alone."""

from __future__ import annotations

import pytest
from nats.js.api import Header, KeyValueConfig, StorageType
from nats.js.errors import APIError

from services.core.bodies import BodyStore
from services.core.bus import connect
from services.core.config import Config, NatsConfig, replace
from services.core.embedded import EmbeddedNats
from services.core.envelope import BodyRef
from services.core.topology import (
    BODY_BUCKET,
    DELIVER_STREAM,
    ROUTE_STREAM,
    SUBMIT_CONSUMER,
    SUBMIT_STREAM,
    SUPPRESSION_BUCKET,
    ensure_topology,
    kv_configs,
    missing_topology,
    object_meta_subject,
    object_stream,
    route_subject,
    stream_configs,
    submit_subject,
    verdict_subject,
)


async def test_existing_buckets_get_direct_gets_and_keep_their_data(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-topology")
    try:
        old = await bus.js.create_key_value(
            KeyValueConfig(bucket=SUPPRESSION_BUCKET, history=1, storage=StorageType.FILE)
        )
        await old.put("acme.x", b"kept")
        assert not (await bus.js.stream_info(f"KV_{SUPPRESSION_BUCKET}")).config.allow_direct

        await ensure_topology(bus.js, config)
        await ensure_topology(bus.js, config)  # idempotent once upgraded

        for bucket in kv_configs(config):
            assert (await bus.js.stream_info(f"KV_{bucket.bucket}")).config.allow_direct, bucket.bucket
        kv = await bus.js.key_value(SUPPRESSION_BUCKET)
        assert (await kv.get("acme.x")).value == b"kept"
    finally:
        await bus.close()


async def test_the_body_store_follows_a_changed_retry_age(nats_server: EmbeddedNats) -> None:
    # Its TTL comes from `retry.max_age`: a changed value used to stop every service at start.
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-topology")
    try:
        await ensure_topology(bus.js, config)
        store = BodyStore(bus.js, 0, bus)
        kept = await store.put("kept", b"a body")
        longer = replace(config, retry={"max_age": config.retry.max_age + 86400})

        await ensure_topology(bus.js, longer)
        await ensure_topology(bus.js, longer)  # idempotent once updated

        info = await bus.js.stream_info(object_stream(BODY_BUCKET))
        assert info.config.max_age == longer.retry.max_age + 2 * 86400
        assert info.config.allow_direct, "the body store's direct reads stay on"
        assert await store.get(kept) == b"a body"
    finally:
        await bus.close()


async def test_an_earlier_body_store_stops_taking_rollups_and_keeps_its_bodies(
    nats_server: EmbeddedNats,
) -> None:
    # The Object Store allows roll-ups, and `Nats-Rollup: all` on any subject of the stream
    # empties it: every service user may publish there, so the body store must refuse them.
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-topology")
    try:
        body = b"a body stored by the release before, in chunks\r\n" * 5000
        earlier = await bus.js.create_object_store(BODY_BUCKET)  # as a release before this made it
        await earlier.put("queued", body)
        assert (await bus.js.stream_info(object_stream(BODY_BUCKET))).config.allow_rollup_hdrs

        await ensure_topology(bus.js, config)

        assert not (await bus.js.stream_info(object_stream(BODY_BUCKET))).config.allow_rollup_hdrs
        with pytest.raises(APIError, match="rollup not permitted"):
            await bus.js.publish(
                object_meta_subject(BODY_BUCKET, "eA=="), b"", headers={Header.ROLLUP: "all"}
            )
        queued = BodyRef(size=len(body), object_name="queued")
        assert await BodyStore(bus.js, 0, bus).get(queued) == body
        assert (await earlier.get("queued")).data == body
    finally:
        await bus.close()


async def test_a_stream_keeps_the_subjects_a_later_release_added(nats_server: EmbeddedNats) -> None:
    # A replica of the earlier release restarting during a rolling upgrade declares the stream
    # again: it must not take away a subject the later release's replicas publish to.
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-topology")
    try:
        (deliver,) = [s for s in stream_configs(config) if s.name == DELIVER_STREAM]
        earlier = [s for s in deliver.subjects or [] if s != verdict_subject()]
        deliver.subjects = [*earlier, "relais.later-release"]
        await bus.js.add_stream(deliver)

        await ensure_topology(bus.js, config)

        subjects = (await bus.js.stream_info(DELIVER_STREAM)).config.subjects or []
        assert verdict_subject() in subjects, "this release's subject was added"
        assert "relais.later-release" in subjects
    finally:
        await bus.close()


async def test_the_release_before_the_submit_stream_gets_it_and_keeps_its_queued_mail(
    nats_server: EmbeddedNats,
) -> None:
    """New mail moved from the route stream (which takes schedules, and so roll-ups) to a stream
    of its own. The topology of the release before has no submit stream: the services of this
    release wait for it, the topology workload adds it, and the mail the release before queued
    on `relais.route` stays there for this release's routers, which read both."""
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-topology")
    try:
        await ensure_topology(bus.js, config)
        await bus.js.delete_stream(SUBMIT_STREAM)  # as the release before had it
        await bus.js.publish(route_subject(), b"accepted by an ingress of the release before")
        assert await missing_topology(bus.js, config) == [
            SUBMIT_STREAM,
            f"{SUBMIT_STREAM} consumer {SUBMIT_CONSUMER}",
        ]

        await ensure_topology(bus.js, config)

        assert await missing_topology(bus.js, config) == []
        assert (await bus.js.stream_info(ROUTE_STREAM)).state.messages == 1
        submit = (await bus.js.stream_info(SUBMIT_STREAM)).config
        assert not submit.allow_msg_schedules and not submit.allow_rollup_hdrs
        with pytest.raises(APIError, match="rollup not permitted"):
            await bus.js.publish(submit_subject(), b"", headers={Header.ROLLUP: "all"})
        assert (await bus.js.publish(submit_subject(), b"new mail")).stream == SUBMIT_STREAM
    finally:
        await bus.close()

"""The webhooks consumer against a real JetStream: it exists only while an account has a webhook,
filters on those accounts, starts at the end of the events stream when created, and an older
release's consumer (every event, from the start) is narrowed in place without losing its place.
Any service creates it when missing; only the bounce service's reconcile changes or deletes it."""

from __future__ import annotations

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.core.bus import Bus, connect
from services.core.config import AccountConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import (
    EVENTS_STREAM,
    WEBHOOKS_CONSUMER,
    ensure_topology,
    ensure_webhooks_consumer,
    event_subject,
)

HOOK = AccountConfig(password_hash="-", webhook_url="http://127.0.0.1:9/hook", webhook_secret="s" * 16)
PLAIN = AccountConfig(password_hash="-")


def config_with(url: str, **accounts: AccountConfig) -> Config:
    return Config(nats=NatsConfig(url=url), accounts=dict(accounts))


async def pending_subjects(bus: Bus) -> list[str]:
    sub = await bus.js.pull_subscribe_bind(WEBHOOKS_CONSUMER, EVENTS_STREAM)
    try:
        msgs = await sub.fetch(100, timeout=1.0)
    except TimeoutError:
        msgs = []
    finally:
        await sub.unsubscribe()
    return [m.subject for m in msgs]


async def test_consumer_follows_the_accounts_with_a_webhook(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-webhooks-consumer")
    url = nats_server.url
    try:
        await ensure_topology(bus.js, config_with(url, plain=PLAIN))
        with pytest.raises(NotFoundError):
            await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)

        # Events from before the webhook existed are not posted to it.
        await bus.js.publish(event_subject("hooked", "accepted"), b"{}")
        await ensure_topology(bus.js, config_with(url, plain=PLAIN, hooked=HOOK))
        info = await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)
        assert info.config.filter_subjects == ["relais.events.hooked.*"]
        assert info.config.deliver_policy == DeliverPolicy.NEW

        await bus.js.publish(event_subject("plain", "delivered"), b"{}")
        await bus.js.publish(event_subject("hooked", "delivered"), b"{}")
        assert await pending_subjects(bus) == ["relais.events.hooked.delivered"]
        assert (await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)).num_pending == 0

        # A service whose configuration lacks the webhook (say, restarted with the previous one
        # during a rollout) leaves the consumer alone; the bounce service's reconcile does not.
        await ensure_topology(bus.js, config_with(url, plain=PLAIN))
        await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)
        both = config_with(url, plain=HOOK, hooked=HOOK)
        await ensure_webhooks_consumer(bus.js, both, reconcile=True)
        info = await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)
        assert info.config.filter_subjects == ["relais.events.hooked.*", "relais.events.plain.*"]
        await ensure_webhooks_consumer(bus.js, config_with(url, plain=PLAIN), reconcile=True)
        with pytest.raises(NotFoundError):
            await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)
    finally:
        await bus.close()


async def test_an_older_consumer_is_narrowed_in_place(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-webhooks-consumer")
    try:
        await ensure_topology(bus.js, config_with(nats_server.url))
        await bus.js.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=WEBHOOKS_CONSUMER,
                filter_subject="relais.events.>",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
            ),
        )
        await bus.js.publish(event_subject("plain", "accepted"), b"{}")
        await bus.js.publish(event_subject("hooked", "accepted"), b"{}")

        config = config_with(nats_server.url, plain=PLAIN, hooked=HOOK)
        await ensure_webhooks_consumer(bus.js, config, reconcile=True)
        info = await bus.js.consumer_info(EVENTS_STREAM, WEBHOOKS_CONSUMER)
        assert info.config.filter_subjects == ["relais.events.hooked.*"]
        assert info.config.deliver_policy == DeliverPolicy.ALL
        assert await pending_subjects(bus) == ["relais.events.hooked.accepted"]
    finally:
        await bus.close()
